"""The LoRA shrink: small[M, R] = drop(a)[M, K] · p[R, K]ᵀ in fp32.

The Triton and TMA routes' shrink (x·Aᵀ in the forward, dY·B where dX is needed), and dY·B alone
where only dA is. Small M splits K over programs (partial sums that the matmul adds up, or atomics
into a zeroed output); from 512 rows, with partial sums, K is split too where the row blocks alone
would leave multiprocessors idle. ``shrink_step`` is the K step every kernel with a shrink shares.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .common import block_r, dot, dot_mode, fp32_precision, gdc_launch_dependents, num_sms, pdl_on
from .dropout import dropout_keep
from .launch import INTERPRETING, Plan, cached, cdiv


@triton.jit
def shrink_step(acc, x, a, seed, rows, k0, threshold, HAS_DROPOUT: tl.constexpr, MODE: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step of the shrink: acc[BLOCK_M, R] + drop(x)[BLOCK_M, BLOCK_K] · a[BLOCK_K, R], the
    mask of x's columns k0 .. k0 + BLOCK_K regenerated from the seed (every kernel with a shrink
    shares it)."""
    if HAS_DROPOUT:
        x = tl.where(dropout_keep(seed, rows, k0, BLOCK_M, BLOCK_K, threshold), x, 0.0)
    return dot(x, a, acc, MODE, PRECISION)


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, seed_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or, stride_os,
    threshold, drop_scale,
    HAS_DROPOUT: tl.constexpr, MODE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
):
    """out[M, R] (fp32) = drop(x)[M, K] · a[R, K]ᵀ · drop_scale, any strides; program (pid_m, pid_k)
    takes BLOCK_M rows and every SPLIT_K-th K block of them. With SPLIT_K > 1 each program stores
    its partial sum at out + pid_k·stride_os (PARTIAL) or adds it into a zeroed out (atomics)."""
    if LAUNCH_DEPENDENTS:  # the next kernel (launched with PDL) may start its main loop now
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        ks = k0 + rk
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
        a = tl.load(a_ptr + rr[None, :] * stride_ar + ks[:, None] * stride_ak,
                    mask=(rr[None, :] < R) & (ks[:, None] < K), other=0.0)
        acc = shrink_step(acc, x, a, seed, rm, k0, threshold, HAS_DROPOUT, MODE, PRECISION, BLOCK_M, BLOCK_K)
    if HAS_DROPOUT:
        acc = acc * drop_scale
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rr[None, :] * stride_or
    omask = (rm[:, None] < M) & (rr[None, :] < R)
    if SPLIT_K == 1:
        tl.store(out, acc, mask=omask)
    elif PARTIAL:  # split pid_k's partial sum, for the consumer to add up (no zeroed output)
        tl.store(out + pid_k.to(tl.int64) * stride_os, acc, mask=omask)
    else:
        tl.atomic_add(out, acc, mask=omask, sem="relaxed")


def lora_shrink(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor | None = None, threshold: int = 0,
                drop_scale: float = 1.0, launch_dependents: bool = False, partial: bool = False) -> torch.Tensor:
    """drop(x) · aᵀ in fp32: x (M, K), a (R, K) (any strides) -> (M, R) fp32.

    Dropout is applied when ``seed`` is given (threshold/scale from fastpeft.reference). With
    ``launch_dependents`` the next kernel, if launched with programmatic dependent launch (PDL), may
    start as soon as this one has (it must wait, ``gdc_wait``, before it reads the result). With
    ``partial`` the result is (S, M, R): the split-K partial sums (S >= 1), for ``lora_linear`` to
    add up in its epilogue — no zero-filled output, one launch less, and a sum in a fixed order.
    """
    key = (_lora_shrink_kernel, x.shape, x.stride(), x.dtype, a.shape, a.stride(), a.dtype,
           None if seed is None else seed.dtype, threshold, drop_scale, fp32_precision(), launch_dependents, partial,
           x.device)
    return cached(key, _shrink_plan, x, a, seed is not None, threshold, drop_scale, launch_dependents, partial)(
        x, a, seed)


# Split-K partial sums of lora_shrink(partial=True): at most this many, since the consumer's epilogue
# reads them on its critical path (the shrink itself runs beside the consumer's main loop under PDL)
MAX_PARTIALS = 8


def _shrink_grid(M: int, K: int, BLOCK_R: int, partial: bool = False, sms: int = 132):
    """(BLOCK_M, BLOCK_K, split_k) of lora_shrink. Small M splits K across programs (atomics into a
    zeroed output, or with ``partial`` at most MAX_PARTIALS partial sums) so the GPU reads x and A
    wide; large M takes K steps of 128 at R <= 32 and, with ``partial`` from 512 rows (the TMA
    route's sizes), splits K until there are two programs per multiprocessor."""
    BLOCK_M = min(16 if M <= 16 else (32 if M <= 32 else 64), max(16, 8192 // BLOCK_R))
    BLOCK_K = 128 if M <= 64 or (M > 256 and BLOCK_R <= 32) else 64
    n_m = max(1, cdiv(M, BLOCK_M))
    if M > 256:
        split_k = max(1, min(cdiv(2 * sms, n_m), cdiv(K, 4 * BLOCK_K))) if partial and M >= 512 else 1
    else:
        split_k = 1 if INTERPRETING and not partial else max(1, min(cdiv(K, BLOCK_K), 128 // n_m))
    return BLOCK_M, BLOCK_K, min(split_k, MAX_PARTIALS) if partial else split_k


def _shrink_plan(x, a, has_dropout: bool, threshold: int, drop_scale: float, launch_dependents: bool = False,
                 partial: bool = False):
    """lora_shrink's work for one shape key: the checks, the tiles, the grid, once."""
    M, K = x.shape
    R, Ka = a.shape
    if Ka != K:
        raise ValueError(f"lora_shrink: x is (M={M}, K={K}) but A is (R={R}, K={Ka})")
    BLOCK_R = block_r(R)
    BLOCK_M, BLOCK_K, split_k = _shrink_grid(M, K, BLOCK_R, partial, num_sms(x.device))
    warps, stages = 4, 3
    pinned = tuning.pinned(tuning.SHRINK)
    if pinned:
        BLOCK_M, BLOCK_K, split_k, warps, stages = pinned
        split_k = max(1, min(split_k, MAX_PARTIALS) if partial else split_k)
    n_m = max(1, cdiv(M, BLOCK_M))
    alloc = torch.zeros if split_k > 1 and not partial else torch.empty
    shape = (split_k, M, R) if partial else (M, R)
    device = x.device
    plan = Plan(_lora_shrink_kernel, (n_m, split_k), (
        M, K, R, *x.stride(), *a.stride(), R, 1, M * R, threshold, drop_scale,
    ), HAS_DROPOUT=has_dropout, MODE=dot_mode(x.dtype, a.dtype), PRECISION=fp32_precision(), SPLIT_K=split_k,
        PARTIAL=partial, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
        LAUNCH_DEPENDENTS=pdl_on(launch_dependents),
        num_warps=warps, num_stages=stages,
    )

    def run(x, a, seed):
        out = alloc(shape, dtype=torch.float32, device=device)
        if M:
            plan.run((x, a, out, out if seed is None else seed))
        return out

    return run
