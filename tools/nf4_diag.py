"""Development: why a 4-bit kernel is slow. Compiles the dequantize and the decode kernels directly for
one 4096 x 4096 NF4 weight and prints, per variant (LUT, nested), the time, registers, spills and the
global load / store instructions of the PTX.

    python tools/nf4_diag.py
"""
from __future__ import annotations

import os
import re
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from common import time_ms  # noqa: E402

from fastpeft.kernels import nf4  # noqa: E402


def ptx_ops(compiled) -> str:
    ptx = compiled.asm["ptx"]
    ops = Counter(m.group(1) for m in re.finditer(r"\b((?:ld|st|atom|red)\.[a-z0-9.]+)", ptx))
    return ", ".join(f"{k}:{v}" for k, v in sorted(ops.items()))


def main():
    import bitsandbytes.functional as bnbf

    K = N = 4096
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / 64
    print(torch.cuda.get_device_name())
    for nested in (False, True):
        packed, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        nest = (st.state2.code, st.state2.absmax, st.state2.blocksize, st.offset) if nested else None
        q = nf4.packed_4bit(packed, st.absmax, st.code, N, K, 64, nest)
        tensors = nf4._weight_tensors(q)
        for lut in (0, 1, 2):
            for BN, BK, warps in ((32, 64, 4), (16, 64, 4), (64, 64, 8)):
                out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
                grid = (N // BN, K // BK)
                meta = dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=nested, ALIGNED=True, LUT=lut, BLOCK_N=BN,
                            BLOCK_K=BK, num_warps=warps)
                c = nf4._nf4_dequant_kernel[grid](*tensors, out, N, K, K, 1, **meta)
                t = time_ms(lambda: nf4._nf4_dequant_kernel[grid](*tensors, out, N, K, K, 1, **meta))
                print(f"dequant nested={nested} lut={lut} BN={BN} BK={BK} w={warps}: {t * 1e3:.1f} us "
                      f"regs={c.n_regs} spills={c.n_spills} | {ptx_ops(c)}", flush=True)
        for lut in (0, 2):
            for M in (1, 16):
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
                BM = 16 if M == 16 else 1
                meta = dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=nested, ALIGNED=True, LUT=lut, HAS_BIAS=False,
                            SPLIT_K=1, USE_DOT=M == 16, MODE=0, EXPAND_MODE=3, PRECISION="tf32", BLOCK_M=BM,
                            BLOCK_N=32, BLOCK_K=64, BLOCK_R=16, num_warps=4, num_stages=4)
                args = (x, *tensors, out, out, out, out, M, N, K, 0, K, 1, 0, 0, 0, 0, N, 1, 1.0)
                grid = (N // 32, 1)
                c = nf4._nf4_gemv_kernel[grid](*args, **meta)
                t = time_ms(lambda: nf4._nf4_gemv_kernel[grid](*args, **meta))
                print(f"gemv M={M} nested={nested} lut={lut}: {t * 1e3:.1f} us regs={c.n_regs} spills={c.n_spills} "
                      f"| {ptx_ops(c)}", flush=True)
    # the floor: a copy of the same number of bytes, and a plain read of the packed bytes as uint8
    src = torch.empty(N * K // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    print(f"copy of the packed bytes: {time_ms(lambda: dst.copy_(src)) * 1e3:.1f} us")
    big = torch.empty(N * K, dtype=torch.bfloat16, device="cuda")
    print(f"write of a bf16 W: {time_ms(lambda: big.zero_()) * 1e3:.1f} us")


if __name__ == "__main__":
    main()
