"""DoRA's weight norm per output row from its low-rank pieces, one pass (fastpeft/dora.py).

* ``dora_norm(sq, wa, B, h, m, s)``  (norm, g): norm² = ‖W‖²_row + Σ_r B ⊙ (2s·(A·Wᵀ)ᵀ + s²·B·(A·Aᵀ)),
                                     g = m / norm, both (N,) fp32

DoRA's magnitude scale around the LoRA linear (y = g ⊙ z + b and its backward) is the column scale of
kernels/ia3.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch


@triton.jit
def _dora_norm_kernel(sq_ptr, wa_ptr, b_ptr, h_ptr, m_ptr, norm_ptr, g_ptr, N, R, s,
                      stride_war, stride_wan, stride_bn, stride_br, stride_hn, stride_hr,
                      BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < N
    ok = row_ok[:, None] & (rr < R)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    b = tl.load(b_ptr + r64 * stride_bn + rr[None, :] * stride_br, mask=ok, other=0.0).to(tl.float32)
    wa = tl.load(wa_ptr + rr[None, :] * stride_war + r64 * stride_wan, mask=ok, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + r64 * stride_hn + rr[None, :] * stride_hr, mask=ok, other=0.0).to(tl.float32)
    sq = tl.load(sq_ptr + rows, mask=row_ok, other=0.0)
    n2 = sq + tl.sum(b * (2.0 * s * wa + s * s * h), 1)
    norm = tl.sqrt(tl.maximum(n2, 0.0))
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    m = tl.load(m_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(g_ptr + rows, m / norm, mask=row_ok)


def dora_norm(sq: torch.Tensor, wa: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor, magnitude: torch.Tensor,
              scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm, g), both (N,) fp32: norm = ‖W + s·B·A‖ per row from its pieces, sq = ‖W‖²_row (N,) fp32,
    wa = A·Wᵀ (R, N), B (N, R), h = B·(A·Aᵀ) (N, R):  norm² = sq + Σ_r B ⊙ (2s·waᵀ + s²·h); g = m / norm
    for the magnitude m (N,). One pass over the N × R pieces (fastpeft/dora.py's weight_norm)."""
    N, R = lora_b.shape
    if sq.shape != (N,) or sq.dtype != torch.float32 or wa.shape != (R, N) or h.shape != (N, R) \
            or magnitude.shape != (N,):
        raise ValueError(f"dora_norm: want sq ({N},) fp32, wa ({R}, {N}), B ({N}, {R}), h ({N}, {R}), magnitude "
                         f"({N},); got {tuple(sq.shape)} {sq.dtype}, {tuple(wa.shape)}, {tuple(h.shape)}, "
                         f"{tuple(magnitude.shape)}")
    norm = torch.empty(N, dtype=torch.float32, device=sq.device)
    g = torch.empty(N, dtype=torch.float32, device=sq.device)
    if N:
        block_r = max(16, triton.next_power_of_2(R))
        block_n = max(16, min(256, 4096 // block_r))
        launch(_dora_norm_kernel, (cdiv(N, block_n),), (sq, wa, lora_b, h, magnitude, norm, g),
               (N, R, float(scaling), *wa.stride(), *lora_b.stride(), *h.stride()),
               BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4)
    return norm, g
