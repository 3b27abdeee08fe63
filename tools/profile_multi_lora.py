"""Development: where a multi-LoRA layer's time goes, on a GPU, measured two ways.

* kernels: each kernel's own duration (torch.profiler, CUDA time per kernel, L2 warm), no launch gaps;
* chain: LAYERS layers with distinct weights (so each reads its weights from memory, as a model's
  layers do) captured in one CUDA graph and replayed: µs per layer for the base ``F.linear`` alone and
  for each route of the layer, the grouping done once per batch (as MultiLora shares it):
  - in place: ``F.linear``, then ``multi_lora`` adds the LoRA terms into its output (read and write);
  - addmm: ``multi_lora_linear``: shrink, the expand writing bias + LoRA terms into a new y, cuBLAS
    ``y.addmm_(x, wᵀ)``;
  - no PDL: in place with the expand launched after the shrink, not with programmatic dependent launch;
  - wide: one ``F.linear`` over [W; A] (N + S·R rows: every slot's A below W, as one buffer), whose
    extra columns are every slot's t for every token; the expand reads each token's own slot's
    columns (``slot_columns``) and adds into the first N in place: no shrink kernel;
  - tma: ``multi_lora_linear_tma``: the shrink, then a persistent TMA matmul whose epilogue adds each
    token's terms (y written once, never read again).

    python tools/profile_multi_lora.py
    FASTPEFT_PROFILE_T=4096 python tools/profile_multi_lora.py     # only the cases of these token counts
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from common import chain_us, graph_time_ms  # noqa: E402

from fastpeft.kernels import tuning  # noqa: E402
from fastpeft.kernels.multi_lora import (_expand_plan, multi_lora, multi_lora_linear,  # noqa: E402
                                         multi_lora_linear_tma, segments)

LAYERS = int(os.environ.get("FASTPEFT_PROFILE_LAYERS", "16"))
CASES = [(2048, 2048, 64, 32, "decode"), (2048, 5632, 64, 32, "decode"), (4096, 4096, 1, 32, "decode"),
         (4096, 4096, 16, 32, "decode"), (4096, 4096, 256, 32, "decode"),
         (4096, 4096, 256, 128, "decode"), (4096, 4096, 4096, 8, "prefill"), (4096, 14336, 256, 32, "decode"),
         (4096, 14336, 4096, 8, "prefill")]
R = 16
if os.environ.get("FASTPEFT_PROFILE_T"):  # only the cases of these token counts (comma-separated)
    CASES = [c for c in CASES if str(c[2]) in os.environ["FASTPEFT_PROFILE_T"].split(",")]


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


ROUTES = ("in place", "no PDL", "addmm", "wide", "tma")


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}; r={R}; chain of {LAYERS} layers with distinct weights in one graph; "
          "µs per layer (× base)")
    print(f"| K | N | T | slots | layout | base | {' | '.join(ROUTES)} | rel diff: addmm, wide, tma | "
          "segments | kernels: in place | kernels: wide | kernels: tma |")
    print("|---" * (12 + len(ROUTES)) + "|")
    for K, N, T, slots, layout in CASES:
        x, ws, As, Bs, scales, ranks = layer_chain(K, N, T, slots)
        idx = _indices(T, slots, layout)
        seg = segments(idx, slots)
        # the wide route's weights: [W; A] per layer
        wides = [torch.cat([w, a.reshape(slots * R, K)]) for w, a in zip(ws, As)]
        y_wide = F.linear(x, wides[0])
        wide_expand = _expand_plan(y_wide[:, N:], Bs[0], seg, ranks, scales, y_wide[:, :N], slot_columns=True)

        def base(i):
            return F.linear(x, ws[i])

        def fast(i):
            return multi_lora(x, F.linear(x, ws[i]), idx, As[i], Bs[i], scales, ranks, seg)

        def via_addmm(i):
            return multi_lora_linear(x, ws[i], None, idx, As[i], Bs[i], scales, ranks, seg)

        def wide(i):
            y = F.linear(x, wides[i])
            return wide_expand(y[:, N:], Bs[i], seg, ranks, scales, y[:, :N])

        def tma(i):
            return multi_lora_linear_tma(x, ws[i], None, idx, As[i], Bs[i], scales, ranks, seg)

        fns = {"in place": (fast, {}), "no PDL": (fast, {"FASTPEFT_PDL": "0"}), "addmm": (via_addmm, {}),
               "wide": (wide, {}), "tma": (tma, {})}
        ref = fast(0).float()
        errs = []
        for fn in (via_addmm, wide, tma):
            try:
                errs.append(f"{((fn(0).float() - ref).norm() / ref.norm()).item():.1e}")
            except Exception as e:  # noqa: BLE001 - the route's failure is printed in its column below
                errs.append(type(e).__name__)
        tb = chain_us(base, LAYERS)
        cols = []
        for route in ROUTES:
            fn, env = fns[route]
            try:
                with tuning.switched(env):
                    us = chain_us(fn, LAYERS)
                cols.append(f"{us:.1f} ({us / tb:.2f})")
            except Exception as e:  # a route that cannot be captured says why and the table goes on
                cols.append(f"failed: {type(e).__name__}: {str(e)[:80]}")
        ts = graph_time_ms(lambda: segments(idx, slots)) * 1e3
        parts = []
        for r in ("in place", "wide", "tma"):
            fn, env = fns[r]
            try:
                with tuning.switched(env):
                    parts.append(", ".join(f"{k} {v:.1f}" for k, v in _kernel_us(lambda: fn(0)).items()))
            except Exception as e:  # noqa: BLE001
                parts.append(type(e).__name__)
        print(f"| {K} | {N} | {T} | {slots} | {layout} | {tb:.1f} | {' | '.join(cols)} | "
              f"{', '.join(errs)} | {ts:.1f} | {' | '.join(parts)} |", flush=True)
        ws = As = Bs = wides = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
