"""DoRA's per-column magnitude scale around the LoRA linear, forward and backward, one pass each.

* ``dora_scale(z, g, bias)``         y = g ⊙ z + b                         (M, N) in z's dtype
* ``dora_scale_backward(dy, z, g)``  (dz, dg_sum): dz = g ⊙ dY in dY's dtype and, in the same pass,
                                     dg_sum[n] = Σ_m dY[m, n] · z[m, n] in fp32 (N,)

z (M, N): the LoRA linear's output without bias (x·Wᵀ + s·(x·Aᵀ)·Bᵀ); g (N,) fp32 = m / ‖W + s·BA‖
(fastpeft/dora.py); math in fp32, one rounding per output. z and dY: 2-D with unit column stride
(the LoRA kernels and autograd produce them so), any row stride. A program takes BLOCK_M rows by
BLOCK_N columns; the backward's column sums are summed over its rows in registers, then added into
dg_sum with one atomic add per column (dg_sum comes zeroed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cached, cdiv, Plan

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_M, BLOCK_N = 32, 256


@triton.jit
def _dora_scale_kernel(z_ptr, g_ptr, b_ptr, y_ptr, M, N, stride_zm, stride_ym,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ok = (rows < M)[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    z = tl.load(z_ptr + r64 * stride_zm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = z * tl.load(g_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + r64 * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dora_scale_backward_kernel(dy_ptr, z_ptr, g_ptr, dz_ptr, dg_ptr, M, N, stride_dym, stride_zm, stride_dzm,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ok = (rows < M)[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    dy = tl.load(dy_ptr + r64 * stride_dym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r64 * stride_zm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
    tl.store(dz_ptr + r64 * stride_dzm + cols[None, :], (dy * g[None, :]).to(dz_ptr.dtype.element_ty), mask=ok)
    tl.atomic_add(dg_ptr + cols, tl.sum(dy * z, 0), mask=col_ok)


def _check(what: str, t: torch.Tensor, name: str, M: int | None = None, N: int | None = None):
    if t.dim() != 2 or t.dtype not in _FLOATS or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{what}: {name} must be 2-D fp16/bf16/fp32 with unit column stride, got "
                         f"{tuple(t.shape)} {t.dtype} strides {t.stride()}")
    if (M is not None and t.shape[0] != M) or (N is not None and t.shape[1] != N):
        raise ValueError(f"{what}: {name} must be ({M}, {N}), got {tuple(t.shape)}")


def _check_vector(what: str, t, name: str, N: int, device, fp32: bool = True):
    if t.shape != (N,) or (fp32 and t.dtype != torch.float32) or t.device != device:
        raise ValueError(f"{what}: {name} must be ({N},){' fp32' if fp32 else ''} on {device}, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}")


def dora_scale(z: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = g ⊙ z + b, a new (M, N) tensor in z's dtype (see the module docstring)."""
    key = (_dora_scale_kernel, z.shape, z.stride(), z.dtype, z.device, g.shape, g.dtype, g.device,
           None if bias is None else (bias.shape, bias.dtype, bias.device))
    return cached(key, _scale_plan, z, g, bias)(z, g, bias)


def _scale_plan(z, g, bias):
    what = "dora_scale"
    _check(what, z, "z")
    M, N = z.shape
    _check_vector(what, g, "g", N, z.device)
    if bias is not None:
        _check_vector(what, bias, "bias", N, z.device, fp32=False)
    plan = Plan(_dora_scale_kernel, (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)), (M, N, z.stride(0), N),
                HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)

    def run(z, g, bias):
        y = torch.empty((M, N), dtype=z.dtype, device=z.device)
        if M and N:
            plan.run((z, g, g if bias is None else bias, y))
        return y

    return run


def dora_scale_backward(dy: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz (M, N) in dY's dtype, dg_sum (N,) fp32): dz = g ⊙ dY, dg_sum = Σ_rows dY ⊙ z."""
    key = (_dora_scale_backward_kernel, dy.shape, dy.stride(), dy.dtype, dy.device, z.shape, z.stride(), z.dtype,
           g.shape, g.dtype, g.device)
    return cached(key, _backward_plan, dy, z, g)(dy, z, g)


def _backward_plan(dy, z, g):
    what = "dora_scale_backward"
    _check(what, dy, "dy")
    M, N = dy.shape
    _check(what, z, "z", M, N)
    _check_vector(what, g, "g", N, dy.device)
    if z.device != dy.device:
        raise ValueError(f"{what}: z is on {z.device}, dy on {dy.device}")
    plan = Plan(_dora_scale_backward_kernel, (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)),
                (M, N, dy.stride(0), z.stride(0), N), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)

    def run(dy, z, g):
        dz = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
        dg = torch.zeros(N, dtype=torch.float32, device=dy.device)
        if M and N:
            plan.run((dy, z, g, dz, dg))
        return dz, dg

    return run


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
        _dora_norm_kernel[(cdiv(N, block_n),)](sq, wa, lora_b, h, magnitude, norm, g, N, R, float(scaling),
                                               *wa.stride(), *lora_b.stride(), *h.stride(),
                                               BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4)
    return norm, g
