"""LoRA linear: fastpeft against F.linear (cuBLAS, the floor) and PEFT, forward and forward+backward.

One bf16 layer, no bias, base frozen (so the floor's backward is dX alone), adapters fp32 as
PEFT keeps them by default, train mode, lora_B non-zero. Ratios are measured in the same run.

    pytest bench/bench_lora.py -s             # the issue's grid (GPU only)
    python bench/bench_lora.py --quick        # a few rows, printed, for development
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
from common import format_table, graph_time_ms, register, time_ms  # noqa: E402

GRAPH_MAX_M = 256  # up to here eager timings measure the host; the graph columns measure the GPU

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]  # (K, N)
MS = [1, 16, 256, 4096, 16384]
RANKS = [8, 16, 64]
DROPOUTS = [0.0, 0.05]
FULL = os.environ.get("FASTPEFT_BENCH_FULL", "0") == "1"


def _grid():
    """The issue's grid; without FASTPEFT_BENCH_FULL=1 only r=16 for the non-square shapes."""
    for (K, N), M, r, p in itertools.product(SHAPES, MS, RANKS, DROPOUTS):
        if FULL or r == 16 or (K, N) == (4096, 4096):
            yield K, N, M, r, p


def make_layers(K, N, r, p, dtype=torch.bfloat16, device="cuda"):
    """(plain nn.Linear, fastpeft LoraLinear, PEFT-wrapped Linear or None) sharing one weight."""
    from fastpeft import LoraLinear

    base = nn.Linear(K, N, bias=False, device=device, dtype=dtype).requires_grad_(False)
    fast = LoraLinear(nn.Linear(K, N, bias=False, device=device, dtype=dtype), r=r, lora_alpha=2 * r,
                      lora_dropout=p).train()
    fast.base_layer.weight.data.copy_(base.weight)
    with torch.no_grad():
        fast.lora_B["default"].weight.normal_(0, 0.02)
    peft_layer = None
    try:
        import peft

        holder = nn.Sequential()
        holder.add_module("proj", nn.Linear(K, N, bias=False, device=device, dtype=dtype))
        holder.proj.weight.data.copy_(base.weight)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["proj"])
        peft_model = peft.get_peft_model(holder, cfg).train()
        peft_layer = peft_model.base_model.model.proj
        peft_layer.lora_A["default"].weight.data.copy_(fast.lora_A["default"].weight)
        peft_layer.lora_B["default"].weight.data.copy_(fast.lora_B["default"].weight)
    except ImportError:
        pass
    return base, fast, peft_layer


def measure(K, N, M, r, p, dtype=torch.bfloat16):
    """(row, fastpeft layer, x): timings (ms) of floor / fastpeft / PEFT, forward and forward+backward."""
    base, fast, peft_layer = make_layers(K, N, r, p, dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(M, N, device="cuda", dtype=dtype)
    row = {"K": K, "N": N, "M": M, "r": r, "dropout": p}

    def fwd(layer):
        return lambda: layer(x)

    def fwd_bwd(layer):
        params = [x] + [t for t in layer.parameters() if t.requires_grad]

        def run():
            torch.autograd.grad(layer(x), params, g)

        return run

    impls = {"linear": base, "fastpeft": fast}
    if peft_layer is not None:
        impls["peft"] = peft_layer
    modes = ("fwd", "fwdbwd") + (("fwd_graph", "fwdbwd_graph") if M <= GRAPH_MAX_M else ())
    # Eager timings in two passes, the second in reverse order, each the mean of its two: the GPU's
    # clock drifts over a run, and an A B B A order cancels a linear drift instead of charging it to
    # whichever implementation runs later (docs/performance.md, Method).
    order = [(name, mode, make) for name in impls for mode, make in (("fwd", fwd), ("fwdbwd", fwd_bwd))]
    eager = {}
    for name, mode, make in order + order[::-1]:
        eager.setdefault((name, mode), []).append(time_ms(make(impls[name])))
    for (name, mode), times in eager.items():
        row[f"{name}_{mode}_ms"] = sum(times) / len(times)
    for name, layer in impls.items():
        if M <= GRAPH_MAX_M:
            row[f"{name}_fwd_graph_ms"] = graph_time_ms(fwd(layer))
            row[f"{name}_fwdbwd_graph_ms"] = graph_time_ms(fwd_bwd(layer))
    for mode in modes:
        row[f"fastpeft/linear_{mode}"] = row[f"fastpeft_{mode}_ms"] / row[f"linear_{mode}_ms"]
        if "peft" in impls:
            row[f"peft/fastpeft_{mode}"] = row[f"peft_{mode}_ms"] / row[f"fastpeft_{mode}_ms"]
    return row, fast, x


@pytest.mark.parametrize("K,N,M,r,p", list(_grid()), ids=lambda v: str(v))
def test_lora_linear(K, N, M, r, p, bench_record, benchmark):
    row, fast, x = measure(K, N, M, r, p)
    bench_record("lora_linear", row)
    register(benchmark, lambda: fast(x), **row)


def compare_gemm(K, N, M, r, p):
    """Development: the main-matmul routes on the same layer: the Triton matmul with the LoRA
    epilogue after a separate shrink ("triton") and cuBLAS onto a prefilled C ("cublas")."""
    base, fast, _ = make_layers(K, N, r, p)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    params = [x] + [t for t in fast.parameters() if t.requires_grad]
    out = {"M": M, "K": K, "N": N, "r": r, "p": p,
           "linear_fwd": time_ms(lambda: base(x)),
           "linear_fwdbwd": time_ms(lambda: torch.autograd.grad(base(x), [x], g))}
    from fastpeft.kernels import tuning

    for name in ("triton", "cublas"):
        os.environ["FASTPEFT_GEMM"] = name
        tuning.reload()  # the switches are read once
        out[f"{name}_fwd"] = time_ms(lambda: fast(x))
        out[f"{name}_fwdbwd"] = time_ms(lambda: torch.autograd.grad(fast(x), params, g))
        if M <= GRAPH_MAX_M:
            out[f"{name}_fwd_graph"] = graph_time_ms(lambda: fast(x))
    os.environ.pop("FASTPEFT_GEMM")
    tuning.reload()
    return out


def tune_linear(K, N, M, configs):
    """Development: forward-kernel time of each tile config (FASTPEFT_LINEAR_CONFIG pins one)."""
    from fastpeft.kernels import tuning
    from fastpeft.kernels.linear import lora_linear
    from fastpeft.kernels.shrink import lora_shrink

    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(16, K, device="cuda", dtype=torch.float32)
    b = torch.randn(N, 16, device="cuda", dtype=torch.float32)
    xa = lora_shrink(x, a)
    floor = time_ms(lambda: F.linear(x, w))
    res = []
    for cfg in configs:
        os.environ["FASTPEFT_LINEAR_CONFIG"] = ",".join(map(str, cfg))
        try:
            tuning.reload()  # the switches are read once
            t = time_ms(lambda: lora_linear(x, w, None, xa, b, 2.0))
        except Exception as e:  # out of shared memory etc.
            t = float("nan")
            print("config", cfg, "failed:", type(e).__name__, str(e)[:100])
        res.append((t, cfg))
    os.environ.pop("FASTPEFT_LINEAR_CONFIG", None)
    tuning.reload()
    res.sort(key=lambda v: (v[0] != v[0], v[0]))
    print(f"M={M} K={K} N={N}: F.linear {floor:.4f} ms; best", [(f"{t:.4f}", c) for t, c in res[:4]], flush=True)
    return res


if __name__ == "__main__":
    if "--compare" in sys.argv:
        for M in MS:
            for p in DROPOUTS:
                o = compare_gemm(4096, 4096, M, 16, p)
                print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in o.items()), flush=True)
    if "--tune" in sys.argv:
        big = [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 8, 4), (128, 256, 64, 16, 8, 3),
               (256, 128, 64, 8, 8, 3)]
        small = [(16, 64, 128, 8, 4, 4), (16, 32, 128, 8, 4, 5), (16, 64, 256, 8, 4, 3), (16, 128, 128, 8, 4, 4),
                 (32, 64, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4), (64, 128, 64, 8, 4, 4), (64, 128, 128, 8, 4, 3),
                 (128, 128, 64, 8, 4, 4)]
        for M in () if "--big-only" in sys.argv else (1, 16, 256):
            tune_linear(4096, 4096, M, small)
        for M in (4096, 16384):
            tune_linear(4096, 4096, M, big)
    if "--table" in sys.argv or "--quick" in sys.argv:
        quick = "--quick" in sys.argv
        rows = []
        grid = ([(4096, 4096, m, 16, p) for m in MS for p in DROPOUTS] if quick else list(_grid()))
        for K, N, M, r, p in grid:
            rows.append(measure(K, N, M, r, p)[0])
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        print(torch.cuda.get_device_name())
        print(format_table(rows))
