"""(IA)³'s elementwise parts: a vector scaling the columns of a 2-D tensor, and its backward.

* ``ia3_scale(a, l, bias)``                    out = a ⊙ l[None, :] (+ bias[None, :])    (R, C), a's dtype
* ``ia3_scale_backward(g, v, l, dg_dtype, ...)`` dg = g ⊙ l[None, :] (R, C) in ``dg_dtype`` and
                                               dl = Σ_rows g ⊙ v (C,) in fp32, each when asked for

a, g, v: (R, C) with any strides (a transposed view too); l: (C,). The math is fp32 whatever the
dtypes, with one rounding into each output: what PEFT's ``(x.to(l.dtype) * l).to(x.dtype)`` gives for
fp32 vectors over a bf16/fp16 tensor. ``ia3_scale``'s output has a's layout (row- or column-major,
``torch.empty_like``). The column sum is deterministic, without atomics: a program reduces ``ROWS``
rows of a ``BLOCK_C`` column block in registers and writes one fp32 partial row; torch sums the
cdiv(R, ROWS) partial rows. fastpeft/ia3.py calls them around cuBLAS' matmuls: on the weight
(scaling its input columns, the feedforward case) or on the base output (the output case), and in
backward on dY·W (dX and dl of the feedforward case) or on dY (the output case). fastpeft/dora.py
calls the same pair for DoRA's magnitude scale (y = g ⊙ z + b; dz = g ⊙ dY and Σ_rows dY ⊙ z).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch

_BLOCK_R, _BLOCK_C = 16, 128  # a tile: 2048 elements, 16 a thread at 4 warps


@triton.jit
def _ia3_scale_kernel(a_ptr, l_ptr, b_ptr, out_ptr, R, C, stride_ar, stride_ac, stride_or, stride_oc,
                      HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r, c] = a[r, c] · l[c] (+ b[c]) in fp32, rounded to out's dtype; one (BLOCK_R, BLOCK_C) tile a
    program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows[:, None] < R) & col_mask[None, :]
    a = tl.load(a_ptr + rows[:, None] * stride_ar + cols[None, :] * stride_ac, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(l_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = a * scale[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_oc, out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _ia3_scale_backward_kernel(g_ptr, v_ptr, l_ptr, dg_ptr, part_ptr, R, C, stride_gr, stride_gc, stride_vr,
                               stride_vc, stride_dr, stride_dc, STORE_DG: tl.constexpr, SUM: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Over rows [pid0·ROWS, (pid0+1)·ROWS) and one column block: STORE_DG: dg = g · l; SUM: the
    partial column sums of g · v (fp32) into row pid0 of ``part`` (cdiv(R, ROWS), C)."""
    pid_r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    scale = tl.load(l_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for i in range(0, ROWS, BLOCK_R):
        rows = pid_r * ROWS + i + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < R) & col_mask[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_gr + cols[None, :] * stride_gc, mask=mask, other=0.0)
        g = g.to(tl.float32)
        if STORE_DG:
            tl.store(dg_ptr + rows[:, None] * stride_dr + cols[None, :] * stride_dc,
                     (g * scale[None, :]).to(dg_ptr.dtype.element_ty), mask=mask)
        if SUM:
            v = tl.load(v_ptr + rows[:, None] * stride_vr + cols[None, :] * stride_vc, mask=mask, other=0.0)
            acc += g * v.to(tl.float32)
    if SUM:
        tl.store(part_ptr + pid_r * C + cols, tl.sum(acc, axis=0), mask=col_mask)


def _check(what: str, l: torch.Tensor, *tensors) -> tuple[int, int]:
    """(R, C) of the 2-D ``tensors`` (one shape, one device) that the vector ``l`` (C,) scales."""
    shape = tensors[0].shape
    if tensors[0].dim() != 2 or any(t.shape != shape for t in tensors):
        raise ValueError(f"{what}: expected 2-D tensors of one shape, got {[tuple(t.shape) for t in tensors]}")
    if l.dim() != 1 or l.shape[0] != shape[1]:
        raise ValueError(f"{what}: the scale vector must be ({shape[1]},) for {tuple(shape)} tensors, got "
                         f"{tuple(l.shape)}")
    if any(t.device != l.device for t in tensors):
        raise ValueError(f"{what}: tensors on different devices: {sorted({str(t.device) for t in (l, *tensors)})}")
    for t in (l, *tensors):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{what}: expected floating-point tensors, got {t.dtype}")
    return shape[0], shape[1]


def ia3_scale(a: torch.Tensor, l: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a ⊙ l[None, :] + bias[None, :] (a (R, C), l (C,), bias (C,) or None), in a's dtype and layout;
    fp32 math, one rounding."""
    R, C = _check("ia3_scale", l, a)
    if bias is not None:
        if tuple(bias.shape) != (C,) or bias.device != a.device or not bias.dtype.is_floating_point:
            raise ValueError(f"ia3_scale: bias must be ({C},) floating point on {a.device}, got {tuple(bias.shape)} "
                             f"{bias.dtype} on {bias.device}")
        bias = bias.contiguous()
    out = torch.empty_like(a)  # a's strides when a is dense (a transposed view stays transposed)
    l = l.contiguous()
    if a.numel():
        launch(_ia3_scale_kernel, (cdiv(R, _BLOCK_R), cdiv(C, _BLOCK_C)), (a, l, l if bias is None else bias, out),
               (R, C, a.stride(0), a.stride(1), out.stride(0), out.stride(1)),
               HAS_BIAS=bias is not None, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=4)
    return out


def _rows_per_program(R: int) -> int:
    """Rows one backward program reduces: up to 256, fewer for small R (more programs, fewer idle ones)."""
    rows = _BLOCK_R
    while rows < 256 and rows * 32 < R:
        rows *= 2
    return rows


def ia3_scale_backward(g: torch.Tensor, v: torch.Tensor, l: torch.Tensor, dg_dtype: torch.dtype,
                       need_dg: bool = True, need_dl: bool = True):
    """(dg, dl): dg = g ⊙ l[None, :] (R, C) contiguous in ``dg_dtype``, dl = Σ_rows g ⊙ v (C,) fp32;
    each None when not asked for (v is read only for dl). g, v (R, C), l (C,)."""
    R, C = _check("ia3_scale_backward", l, g, v) if need_dl else _check("ia3_scale_backward", l, g)
    if not (need_dg or need_dl):
        return None, None
    l = l.contiguous()
    dg = torch.empty((R, C), dtype=dg_dtype, device=g.device) if need_dg else None
    rows = _rows_per_program(R)
    part = torch.empty((cdiv(R, rows), C), dtype=torch.float32, device=g.device) if need_dl else None
    if R and C:
        vv = v if need_dl else g
        dd = dg if need_dg else g
        pp = part if need_dl else l
        launch(_ia3_scale_backward_kernel, (cdiv(R, rows), cdiv(C, _BLOCK_C)), (g, vv, l, dd, pp),
               (R, C, g.stride(0), g.stride(1), vv.stride(0), vv.stride(1), dd.stride(0), dd.stride(1)),
               STORE_DG=need_dg, SUM=need_dl, ROWS=rows, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=4)
    dl = None
    if need_dl:
        dl = part.sum(0) if R else torch.zeros(C, dtype=torch.float32, device=g.device)
    return dg, dl
