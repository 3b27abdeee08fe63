"""QLoRA layer forward+backward: fastpeft's LoraLinear over a 4-bit base against PEFT + bitsandbytes,
and the bf16 frozen floor.

One layer, no bias, at training sizes. W (N, K) = randn / √K in bf16; two ``bitsandbytes.nn.Linear4bit``
(NF4, double quantization, compute dtype bf16) are quantized from it the way bitsandbytes does it
(created on the CPU holding W, moved to the GPU), so both 4-bit bases hold the same bytes. LoRA r=16,
alpha 32, dropout 0 and 0.05, adapters fp32 (PEFT's default), train mode, lora_B ~ N(0, 0.02) and
equal in both. x is bf16 and requires grad; one call is ``torch.autograd.grad(layer(x), [x, *trainable
params], g)``. Columns, timed in the same run in A B C C B A order (common.time_ms, the median of
do_bench):

* ``floor_ms``: ``F.linear(x, W)`` in bf16 and its dX, the frozen bf16 layer (cuBLAS);
* ``peft_ms``: PEFT's LoRA over the Linear4bit (``peft.get_peft_model`` on a module marked
  ``is_loaded_in_4bit``, as transformers marks a 4-bit model, so PEFT takes its bitsandbytes layer);
* ``fastpeft_ms``: ``fastpeft.LoraLinear(linear4bit, ...)``; None (with ``fastpeft_error``) where
  fastpeft raises NotImplementedError for a 4-bit base.

``rel_diff`` is max |fastpeft - PEFT| / max |PEFT| of one forward in eval mode (no dropout).

    pytest bench/bench_qlora.py -s          # the grid below (GPU only; under a minute on an H100)
    python bench/bench_qlora.py --quick     # 4096 x 4096 at M = 4096, printed, for development
"""
from __future__ import annotations

import gc
import itertools
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, format_table, register, time_ms  # noqa: E402

TABLE = "qlora_layer"
SHAPES = [(4096, 4096), (4096, 14336)]  # (K, N)
MS = [4096, 16384]
DROPOUTS = [0.0, 0.05]
RANK, ALPHA = 16, 32
MAX_REL_DIFF = 0.05  # fastpeft against PEFT on the same bytes and adapters; far above bf16 rounding

RESULTS.notes[TABLE] = (
    f"One layer, bf16 x, W NF4 (blocksize 64, double quantization) in bnb.nn.Linear4bit, LoRA r={RANK} alpha "
    f"{ALPHA}, fp32 adapters, forward+backward (dX and the adapters' grads); floor: bf16 F.linear + dX. "
    "fastpeft/floor < 1 and peft/fastpeft > 1: fastpeft is faster.")


def grid():
    for (K, N), M, p in itertools.product(SHAPES, MS, DROPOUTS):
        yield K, N, M, p


def derive_row(row: dict) -> dict:
    """The ratio columns of a row from its ``*_ms`` columns (None where fastpeft has no time)."""
    fast = row.get("fastpeft_ms")
    row["fastpeft/floor"] = fast / row["floor_ms"] if fast is not None else None
    row["peft/fastpeft"] = row["peft_ms"] / fast if fast is not None else None
    return row


def linear4bit(W: torch.Tensor, device="cuda") -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` (NF4, double quantization, bf16 compute, no bias) holding W
    (N, K): made on the CPU with W as its weight, then moved to ``device``, where Params4bit quantizes it."""
    import bitsandbytes as bnb

    N, K = W.shape
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    layer.weight.data = W.detach().to("cpu", torch.bfloat16)
    return layer.to(device)


def make_layers(K: int, N: int, p: float, device="cuda"):
    """(W bf16, PEFT's layer, fastpeft's layer or None, why fastpeft's is None or None): the two LoRA
    layers over 4-bit copies of one W, with equal adapters."""
    import peft

    import fastpeft

    torch.manual_seed(0)
    W = torch.randn(N, K, dtype=torch.bfloat16, device=device) / math.sqrt(K)
    holder = nn.Sequential()
    holder.add_module("proj", linear4bit(W, device))
    holder.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model: PEFT then takes its bnb layer
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p, target_modules=["proj"])
    peft_layer = peft.get_peft_model(holder, cfg).train().base_model.model.proj
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.02)
    base = linear4bit(W, device)
    assert torch.equal(base.weight.data, peft_layer.base_layer.weight.data), "the two quantizations of W differ"
    try:
        fast = fastpeft.LoraLinear(base, r=RANK, lora_alpha=ALPHA, lora_dropout=p).train()
    except NotImplementedError as e:
        return W, peft_layer, None, f"NotImplementedError: {e}"
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(fast, name)["default"].weight.copy_(getattr(peft_layer, name)["default"].weight)
    return W, peft_layer, fast, None


def rel_diff(peft_layer, fast, x) -> float:
    """max |fastpeft - PEFT| / max |PEFT| of one forward in eval mode (dropout off)."""
    peft_layer.eval()
    fast.eval()
    with torch.no_grad():
        ref, out = peft_layer(x).float(), fast(x).float()
    peft_layer.train()
    fast.train()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def measure(K: int, N: int, M: int, p: float, device="cuda"):
    """(row, held, fastpeft's fwd+bwd callable or None); ``held.clear()`` lets the row's tensors and
    layers go (the callables read them from ``held``)."""
    W, peft_layer, fast, fast_error = make_layers(K, N, p, device)
    held = {"x": torch.randn(M, K, dtype=torch.bfloat16, device=device, requires_grad=True),
            "g": torch.randn(M, N, dtype=torch.bfloat16, device=device), "W": W, "peft": peft_layer, "fastpeft": fast}
    row = {"K": K, "N": N, "M": M, "r": RANK, "dropout": p}
    diff = None
    if fast is not None:
        try:
            diff = rel_diff(peft_layer, fast, held["x"])
        except NotImplementedError as e:
            fast, fast_error = None, f"NotImplementedError: {e}"
            held["fastpeft"] = None

    def floor():
        return torch.autograd.grad(F.linear(held["x"], held["W"]), [held["x"]], held["g"])

    def fwd_bwd(name):
        def run():
            layer = held[name]
            params = [held["x"]] + [t for t in layer.parameters() if t.requires_grad]
            return torch.autograd.grad(layer(held["x"]), params, held["g"])

        return run

    calls = {"floor": floor, "peft": fwd_bwd("peft")}
    if fast is not None:
        calls["fastpeft"] = fwd_bwd("fastpeft")
    # Two passes, the second in reverse (A B C C B A), each cell their mean: the GPU's clock drifts
    # over a run (docs/performance.md, Method).
    order = list(calls)
    times: dict[str, list[float]] = {}
    for name in order + order[::-1]:
        times.setdefault(name, []).append(time_ms(calls[name]))
    for name in ("floor", "peft", "fastpeft"):
        row[f"{name}_ms"] = sum(times[name]) / len(times[name]) if name in times else None
    derive_row(row)
    row["rel_diff"] = diff
    if fast_error is not None:
        row["fastpeft_error"] = fast_error[:120]
    return row, held, calls.get("fastpeft")


@pytest.mark.parametrize("K,N,M,p", list(grid()), ids=[f"K{K}-N{N}-M{M}-dropout{p:g}" for K, N, M, p in grid()])
def test_qlora_layer(K, N, M, p, gpu_name, bench_record, benchmark):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    row, held, fast = measure(K, N, M, p)
    bench_record(TABLE, row)
    if fast is not None:
        register(benchmark, fast, **row)
    held.clear()
    gc.collect()
    torch.cuda.empty_cache()
    if row["rel_diff"] is not None:
        assert row["rel_diff"] < MAX_REL_DIFF, f"max |fastpeft - PEFT| / max |PEFT| = {row['rel_diff']:.3g}"


if __name__ == "__main__":
    if "--quick" in sys.argv:
        rows = []
        for p in DROPOUTS:
            rows.append(measure(4096, 4096, 4096, p)[0])
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        print(torch.cuda.get_device_name())
        print(format_table(rows))
