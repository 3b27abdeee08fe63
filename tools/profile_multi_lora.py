"""Development: where a multi-LoRA layer's time goes, on a GPU, measured two ways.

* kernels: each kernel's own duration (torch.profiler, CUDA time per kernel, L2 warm), no launch gaps;
* chain: LAYERS layers with distinct weights (so each reads its weights from memory, as a model's
  layers do) captured in one CUDA graph and replayed: µs per layer for the base ``F.linear`` alone,
  for ``F.linear`` + ``multi_lora``, for ``multi_lora_linear`` (the grouping done once per batch,
  as MultiLora shares it) and for ``F.linear`` + the public shrink and expand (t zero-filled, split-K
  sums by atomics: what the layer launchers did before their partial sums): the ratios the serving
  targets name, without one graph launch per layer.

    python tools/profile_multi_lora.py
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from common import chain_us, graph_time_ms  # noqa: E402

from fastpeft.kernels.multi_lora import (multi_lora, multi_lora_expand, multi_lora_linear,  # noqa: E402
                                         multi_lora_shrink, segments)

LAYERS = int(os.environ.get("FASTPEFT_PROFILE_LAYERS", "16"))
CASES = [(4096, 4096, 1, 32, "decode"), (4096, 4096, 16, 32, "decode"), (4096, 4096, 256, 32, "decode"),
         (4096, 4096, 256, 128, "decode"), (4096, 4096, 4096, 8, "prefill"), (4096, 14336, 256, 32, "decode"),
         (4096, 14336, 4096, 8, "prefill")]
R = 16


def _indices(T, slots, layout):
    gen = torch.Generator(device="cpu").manual_seed(T * 131 + slots)
    if layout == "prefill":
        return torch.randint(0, slots, (8,), generator=gen).repeat_interleave(T // 8).to(torch.int32).cuda()
    return torch.randint(0, slots, (T,), generator=gen).to(torch.int32).cuda()


def _kernel_us(fn, reps=20):
    """Mean CUDA time per call of each kernel ``fn`` launches, by kernel name (µs)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            out[ev.name[:40]] += ev.device_time / reps
    return dict(out)


def layer_chain(K: int, N: int, T: int, slots: int, layers: int = LAYERS) -> tuple:
    """(x (T, K), ``layers`` weights (N, K), stacked A and B per layer, scales, ranks): bf16 on the GPU,
    r = R in every slot, scaling 2."""
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(layers)]
    As = [torch.randn(slots, R, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(layers)]
    Bs = [torch.randn(slots, N, R, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    scales = torch.full((slots,), 2.0, device="cuda")
    ranks = torch.full((slots,), R, device="cuda", dtype=torch.int32)
    return x, ws, As, Bs, scales, ranks


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}; r={R}; chain of {LAYERS} layers with distinct weights in one graph")
    print("| K | N | T | slots | layout | base µs/layer | +multi_lora µs/layer | ratio | multi_lora_linear µs/layer | "
          "ratio | zero-filled t µs/layer | rel diff | segments µs | kernels (µs, L2 warm) | fused kernels |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for K, N, T, slots, layout in CASES:
        x, ws, As, Bs, scales, ranks = layer_chain(K, N, T, slots)
        idx = _indices(T, slots, layout)
        seg = segments(idx, slots)

        def base(i):
            return F.linear(x, ws[i])

        def fast(i):
            return multi_lora(x, F.linear(x, ws[i]), idx, As[i], Bs[i], scales, ranks, seg)

        def fused(i):
            return multi_lora_linear(x, ws[i], None, idx, As[i], Bs[i], scales, ranks, seg)

        def zeroed(i):
            t = multi_lora_shrink(x, As[i], seg, ranks)
            return multi_lora_expand(t, Bs[i], seg, ranks, scales, F.linear(x, ws[i]))

        y0, y1 = fast(0).float(), fused(0).float()
        err = ((y1 - y0).norm() / y0.norm()).item()
        tb, tf, tu, tz = (chain_us(fn, LAYERS) for fn in (base, fast, fused, zeroed))
        ts = graph_time_ms(lambda: segments(idx, slots)) * 1e3
        ks = _kernel_us(lambda: fast(0))
        ku = _kernel_us(lambda: fused(0))
        parts = ", ".join(f"{k} {v:.1f}" for k, v in ks.items())
        uparts = ", ".join(f"{k} {v:.1f}" for k, v in ku.items())
        print(f"| {K} | {N} | {T} | {slots} | {layout} | {tb:.1f} | {tf:.1f} | {tf / tb:.2f} | {tu:.1f} | "
              f"{tu / tb:.2f} | {tz:.1f} | {err:.1e} | {ts:.1f} | {parts} | {uparts} |", flush=True)
        ws = As = Bs = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
