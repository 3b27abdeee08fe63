"""Multi-LoRA serving: one layer's mixed-adapter batch, fastpeft against the base matmul and PEFT.

One bf16 linear layer (K in, N out) with ``slots`` adapters resident (stacked A (slots, r_max, K), B
(slots, N, r_max), bf16) and T tokens, each with its adapter: "decode" batches scatter one token per
sequence over the adapters at random, "prefill" batches hold 8 sequences of T/8 tokens, one adapter each.
Columns, timed in the same run (common.time_ms, A B B A order): ``base_ms`` (``F.linear`` alone, the
floor), ``fastpeft_ms`` (``F.linear``, then ``kernels.multi_lora.multi_lora`` adding every token's LoRA
term in place, the tokens' grouping ``segments`` included: MultiLora's route for a layer that is not
wide), ``fused_ms`` (``multi_lora_linear``: the shrink, the expand writing the LoRA terms, cuBLAS's addmm
adding the base product onto them; the route ``FASTPEFT_MULTI_LORA_FUSED=1`` takes), ``wide_ms``
(``multi_lora_wide``: one ``F.linear`` over the weight with the slots' A below it, every slot's t in its
extra columns, then the expand in place: MultiLora's route for a layer whose slots' A fit
``WIDE_MAX_BYTES``), ``tma_ms`` (prefill rows: ``multi_lora_linear_tma``, the shrink, then a TMA
matmul with every token's LoRA term in its epilogue: MultiLora's route for a prefill batch,
``prefill_tma``), ``peft_ms`` (PEFT's ``lora.Linear`` with ``adapter_names=``, the adapters as
separate modules, up to 32 of them). In CUDA graphs (the GPU time without the host): ``*_graph_ms``
one layer replayed; ``*_chain_us`` CHAIN layers with distinct weights replayed as one graph, per layer
(what a model's decode step pays: no graph launch per layer, each layer's weights read from memory),
with the grouping done once per batch outside the layers as ``MultiLora`` shares it. ``rel_diff``,
``fused_rel_diff``, ``wide_rel_diff``, ``tma_rel_diff``: each route's relative distance from PEFT's output. Ranks: one r
for every adapter, or "mixed" (8 to 64 by slot, r_max 64).

    pytest bench/bench_multi_lora.py -s           # the grid below (GPU only)
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, chain_us, graph_time_ms, register, time_ms  # noqa: E402

TABLE = "multi_lora_layer"
CHAIN = int(os.environ.get("FASTPEFT_BENCH_CHAIN", "16"))
SHAPES = [(4096, 4096), (4096, 14336)]  # (K, N)
TOKENS = [1, 16, 256, 4096]
SLOTS = [1, 8, 32, 128]
PEFT_MAX_SLOTS = 32  # PEFT's mixed batch loops over adapters in Python: beyond this it only takes minutes


def _grid():
    for (K, N), T, slots in itertools.product(SHAPES, TOKENS, SLOTS):
        yield K, N, T, slots, "16", "decode"
    for (K, N), slots in itertools.product(SHAPES, (8, 32)):
        yield K, N, 4096, slots, "16", "prefill"
    for r in ("8", "64", "mixed"):
        yield 4096, 4096, 256, 32, r, "decode"


def _ranks(slots: int, r: str) -> list[int]:
    if r == "mixed":
        return [(8, 16, 32, 64)[i % 4] for i in range(slots)]
    return [int(r)] * slots


def _indices(T: int, slots: int, layout: str, device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(T * 131 + slots)
    if layout == "prefill":
        per = torch.randint(0, slots, (8,), generator=gen)
        return per.repeat_interleave(T // 8).to(torch.int32).to(device)
    return torch.randint(0, slots, (T,), generator=gen).to(torch.int32).to(device)


def _peft_layer(K, N, ranks, A, B, scales):
    import peft

    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16))
    model = None
    for s, r in enumerate(ranks):
        cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"])
        if model is None:
            model = peft.get_peft_model(holder, cfg, adapter_name=f"a{s}")
        else:
            model.add_adapter(f"a{s}", cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for s, r in enumerate(ranks):
            layer.lora_A[f"a{s}"].weight.copy_(A[s, :r].float())
            layer.lora_B[f"a{s}"].weight.copy_(B[s, :, :r].float())
            layer.scaling[f"a{s}"] = float(scales[s])
    return model.eval(), layer


@pytest.mark.parametrize("K,N,T,slots,r,layout", list(_grid()), ids=lambda v: str(v))
def test_multi_lora_layer(K, N, T, slots, r, layout, gpu_name, bench_record, benchmark):
    from fastpeft.kernels.multi_lora import (multi_lora, multi_lora_linear, multi_lora_linear_tma, multi_lora_wide,
                                             segments)

    ranks = _ranks(slots, r)
    r_max = max(ranks)
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    A = torch.randn(slots, r_max, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    B = torch.randn(slots, N, r_max, device="cuda", dtype=torch.bfloat16) * 0.02
    scales = torch.full((slots,), 2.0, device="cuda")
    rank_t = torch.tensor(ranks, dtype=torch.int32, device="cuda")
    indices = _indices(T, slots, layout, "cuda")

    def base():
        return F.linear(x, w)

    def fast():  # MultiLora's default route: F.linear, then the LoRA terms in place
        return multi_lora(x, F.linear(x, w), indices, A, B, scales, rank_t)

    def fused():  # the fused route (FASTPEFT_MULTI_LORA_FUSED=1)
        return multi_lora_linear(x, w, None, indices, A, B, scales, rank_t)

    def wide():  # a wide layer (MultiLora's route where the slots' A fit WIDE_MAX_BYTES)
        return multi_lora_wide(x, w_wide, None, indices, B, scales, rank_t)[:, :N]

    def tma():  # MultiLora's route for a prefill batch (``prefill_tma``)
        return multi_lora_linear_tma(x, w, None, indices, A, B, scales, rank_t)

    seg = segments(indices, slots)
    # CHAIN layers' weights (W, A, B; the first one's are the single layer's), for the chain columns
    ws = [w] + [torch.randn_like(w) / K**0.5 for _ in range(CHAIN - 1)]
    As = [A] + [torch.randn_like(A) / K**0.5 for _ in range(CHAIN - 1)]
    Bs = [B] + [torch.randn_like(B) * 0.02 for _ in range(CHAIN - 1)]
    wides = [torch.cat([w_, a.reshape(slots * r_max, K)]) for w_, a in zip(ws, As)]  # [W; A] per layer
    w_wide = wides[0]

    row = {"K": K, "N": N, "T": T, "slots": slots, "r": r, "layout": layout}
    impls = {"base": base, "fastpeft": fast, "fused": fused, "wide": wide}
    routes = [("rel_diff", fast), ("fused_rel_diff", fused), ("wide_rel_diff", wide)]
    if layout == "prefill":
        impls["tma"] = tma
        routes.append(("tma_rel_diff", tma))
    if slots <= PEFT_MAX_SLOTS:
        try:
            model, layer = _peft_layer(K, N, ranks, A, B, scales)
            layer.base_layer.weight.data.copy_(w)
            names = [f"a{int(s)}" for s in indices.tolist()]
            x3 = x.unsqueeze(1)  # one token per row: adapter_names name each row

            def peft_call():
                return layer(x3, adapter_names=names)

            impls["peft"] = peft_call
            with torch.no_grad():
                ref = peft_call().squeeze(1).float()
                for name, fn in routes:
                    row[name] = ((fn().float() - ref).norm() / ref.norm()).item()
        except ImportError:
            pass
    times: dict = {}
    with torch.no_grad():
        order = list(impls)
        for name in order + order[::-1]:
            times.setdefault(name, []).append(time_ms(impls[name]))
        for name, ts in times.items():
            row[f"{name}_ms"] = sum(ts) / len(ts)
        row["fastpeft_graph_ms"] = graph_time_ms(fast)
        row["base_graph_ms"] = graph_time_ms(base)
        row["base_chain_us"] = chain_us(lambda i: F.linear(x, ws[i]), CHAIN)
        row["fastpeft_chain_us"] = chain_us(
            lambda i: multi_lora(x, F.linear(x, ws[i]), indices, As[i], Bs[i], scales, rank_t, seg), CHAIN)
        row["fused_chain_us"] = chain_us(
            lambda i: multi_lora_linear(x, ws[i], None, indices, As[i], Bs[i], scales, rank_t, seg), CHAIN)
        row["wide_chain_us"] = chain_us(
            lambda i: multi_lora_wide(x, wides[i], None, indices, Bs[i], scales, rank_t, seg), CHAIN)
        if "tma" in impls:
            row["tma_chain_us"] = chain_us(
                lambda i: multi_lora_linear_tma(x, ws[i], None, indices, As[i], Bs[i], scales, rank_t, seg), CHAIN)
            row["chain tma/base"] = row["tma_chain_us"] / row["base_chain_us"]
    row["fastpeft/base"] = row["fastpeft_ms"] / row["base_ms"]
    row["graph fastpeft/base"] = row["fastpeft_graph_ms"] / row["base_graph_ms"]
    row["chain fastpeft/base"] = row["fastpeft_chain_us"] / row["base_chain_us"]
    row["chain fused/base"] = row["fused_chain_us"] / row["base_chain_us"]
    row["chain wide/base"] = row["wide_chain_us"] / row["base_chain_us"]
    if "peft_ms" in row:
        row["peft/fastpeft"] = row["peft_ms"] / row["fastpeft_ms"]
    bench_record(TABLE, row)
    register(benchmark, fast, gpu=gpu_name, **row)
    for name, _ in routes:
        if name in row:
            assert row[name] < 2e-2, f"fastpeft's mixed batch ({name}) is {row[name]:.3e} off PEFT's"


RESULTS.derive(TABLE, lambda rows: rows, note=(
    "bf16 layer, adapters bf16 (PEFT's fp32 copies), scaling 2; decode: one token per row, adapters at random; "
    "prefill: 8 sequences of T/8 tokens; fastpeft = F.linear then multi_lora in place (MultiLora's default route; "
    "segments included); fused = multi_lora_linear (FASTPEFT_MULTI_LORA_FUSED=1); wide = multi_lora_wide (W and the "
    "slots' A one weight); tma = multi_lora_linear_tma (prefill rows: MultiLora's route there); "
    "*_graph_ms: one layer's CUDA-graph replay; *_chain_us: per layer of a chain of distinct layers in one graph, "
    "segments given."))
