"""Development: the 4-bit kernels' tile configs and table lookups against each other and against the
baselines (F.linear in bf16, bitsandbytes, the device's copy rate), on a GPU, one table per part.

    python tools/tune_nf4.py [gemv] [tiled] [t] [lut] [dequant]      (no argument: every part)

Pins configs through kernels/tuning.py's switches (FASTPEFT_NF4_*), times with bench/common.py's
time_ms (the median of do_bench, L2 flushed). What it found goes into configs.py and
docs/performance.md; it is not part of the benchmark table.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from common import time_ms  # noqa: E402

from fastpeft.kernels import configs, launch, tuning  # noqa: E402
from fastpeft.kernels.nf4 import nf4_dequantize, nf4_matmul, nf4_matmul_t, packed_4bit  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
GEMV = {1: [(8, 16, 0, 4, 1), (4, 16, 0, 4, 1), (16, 8, 0, 4, 1), (8, 8, 0, 4, 1), (16, 16, 0, 8, 1)],
        4: [(8, 8, 0, 4, 1), (4, 8, 0, 4, 1), (8, 4, 0, 4, 1), (16, 4, 0, 4, 1)],
        16: [(64, 4, 0, 4, 1), (64, 2, 0, 4, 1), (32, 4, 0, 4, 1), (128, 2, 0, 8, 1)],
        64: [(64, 4, 0, 4, 1), (64, 2, 0, 4, 1), (128, 2, 0, 8, 1)]}
DEQUANT = [(2048, 4), (4096, 4), (8192, 8), (16384, 8), (4096, 8), (8192, 4)]
TILED = [(64, 64, 64, 8, 4, 3), (64, 128, 64, 8, 4, 3), (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3),
         (128, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4)]
ROWS_TILED = [256, 4096]


def quantized(K: int, N: int):
    import bitsandbytes.functional as bnbf

    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    nest = (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset)
    return w, packed, state, packed_4bit(packed, state.absmax, state.code, N, K, 64, nest)


def pin(name: str, value) -> None:
    text = ",".join(map(str, value)) if isinstance(value, tuple) else value if value is None else str(value)
    tuning.set_switches({name: text})


def timed(fn) -> float:
    try:
        return time_ms(fn)
    except Exception as error:  # a config that does not compile or fit
        print("  failed:", type(error).__name__, str(error)[:120], flush=True)
        return float("nan")


def copy_gbps() -> float:
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def main(parts):
    import bitsandbytes as bnb

    print(torch.cuda.get_device_name(), flush=True)
    copy = copy_gbps()
    print(f"copy rate {copy:.0f} GB/s (read + written)", flush=True)
    weights = {shape: quantized(*shape) for shape in SHAPES}
    if "gemv" in parts or "lut" in parts:
        for M in GEMV:
            for (K, N), (w, packed, state, q) in weights.items():
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                base = time_ms(lambda: F.linear(x, w))
                ref = time_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))
                row = [f"M={M} K={K} N={N}: F.linear {base * 1e3:.1f} us, bnb {ref * 1e3:.1f} us"]
                luts = ("0", "2") if "lut" in parts else ("0",)
                for lut in luts:
                    pin(tuning.NF4_LUT, lut)
                    res = []
                    for cfg in GEMV[M] if lut == "0" else GEMV[M][:2]:
                        pin(tuning.NF4_GEMV, cfg)
                        t = timed(lambda: nf4_matmul(x, q, path="gemv"))
                        res.append((t, cfg))
                    res.sort(key=lambda v: (v[0] != v[0], v[0]))
                    t, cfg = res[0]
                    row.append(f"lut{lut} best {t * 1e3:.1f} us {cfg} ({N * K / 2 / (t * 1e-3) / 1e9:.0f} GB/s, "
                               f"{N * K / 2 / (t * 1e-3) / 1e9 / copy:.0%} of copy; x{t / base:.2f} of F.linear, "
                               f"bnb x{ref / t:.1f}); next " + ", ".join(f"{v * 1e3:.1f}{c}" for v, c in res[1:4]))
                print("\n  ".join(row), flush=True)
        pin(tuning.NF4_GEMV, None)
        pin(tuning.NF4_LUT, None)
    if "dequant" in parts:
        for (K, N), (w, packed, state, q) in weights.items():
            res = []
            for cfg in DEQUANT:
                configs.NF4_DEQUANT_CONFIGS["sm90"] = cfg
                launch._plans.clear()
                res.append((timed(lambda: nf4_dequantize(q, torch.bfloat16)), cfg))
            res.sort(key=lambda v: (v[0] != v[0], v[0]))
            write = N * K * 2 + N * K / 2
            print(f"dequantize K={K} N={N}: best {res[0][0] * 1e3:.1f} us {res[0][1]} ({write / (res[0][0] * 1e-3) / 1e9:.0f} "
                  f"GB/s read + written, {write / (res[0][0] * 1e-3) / 1e9 / copy:.0%} of copy); next "
                  + ", ".join(f"{v * 1e3:.1f}{c}" for v, c in res[1:3]), flush=True)
        configs.NF4_DEQUANT_CONFIGS["sm90"] = DEQUANT[1]
        launch._plans.clear()
    if "tiled" in parts or "dequant" in parts:
        for M in ROWS_TILED + [16384]:
            for (K, N), (w, packed, state, q) in weights.items():
                if M * max(K, N) > 16384 * 14336:
                    continue
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                base = time_ms(lambda: F.linear(x, w))
                deq = time_ms(lambda: F.linear(x, nf4_dequantize(q, torch.bfloat16)))
                only = time_ms(lambda: nf4_dequantize(q, torch.bfloat16))
                ref = time_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))
                line = (f"M={M} K={K} N={N}: F.linear {base:.4f} ms; dequant+F.linear {deq:.4f} (x{deq / base:.3f}, "
                        f"dequant alone {only * 1e3:.1f} us); bnb {ref:.4f}")
                if "tiled" in parts and M in ROWS_TILED:
                    res = []
                    for cfg in TILED:
                        pin(tuning.NF4_TILED, cfg)
                        res.append((timed(lambda: nf4_matmul(x, q, path="tiled")), cfg))
                    res.sort(key=lambda v: (v[0] != v[0], v[0]))
                    line += f"; tiled best {res[0][0]:.4f} {res[0][1]} (x{res[0][0] / base:.3f})"
                print(line, flush=True)
        pin(tuning.NF4_TILED, None)
    if "t" in parts:
        for M in ROWS_TILED:
            for (K, N), (w, packed, state, q) in weights.items():
                dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                base = time_ms(lambda: dy @ w)
                deq = time_ms(lambda: dy @ nf4_dequantize(q, torch.bfloat16))
                res = []
                for cfg in TILED:
                    pin(tuning.NF4_TILED, cfg)
                    res.append((timed(lambda: nf4_matmul_t(dy, q)), cfg))
                res.sort(key=lambda v: (v[0] != v[0], v[0]))
                print(f"dX M={M} K={K} N={N}: dy@W {base:.4f} ms; dequant+matmul {deq:.4f} (x{deq / base:.3f}); "
                      f"transposed best {res[0][0]:.4f} {res[0][1]} (x{res[0][0] / base:.3f})", flush=True)
        pin(tuning.NF4_TILED, None)


if __name__ == "__main__":
    main(set(sys.argv[1:]) or {"gemv", "tiled", "t", "lut", "dequant"})
