"""The LoRA shrink and expand over a block of rows in one pass: small = drop(a)·pᵀ (fp32, written)
and out[M, N] = bias + s·(small · qᵀ) [⊙ keep].

The cuBLAS route's C, onto which cuBLAS then adds a·wᵀ (beta = 1). Forward: a = x, p = A, q = B,
dropout on x. Backward: a = dY, p = Bᵀ, q = Aᵀ, the dropout mask on the output (m, k) — the same bits
the forward used on x; small = dyb = dY·B.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block_r, dot, dot_mode, expand_mode, fp32_precision, num_sms
from .dropout import dropout_keep
from .launch import INTERPRETING, Plan, cached, cdiv
from .shrink import shrink_step


@triton.jit
def _lora_shrink_expand_kernel(
    a_ptr, p_ptr, q_ptr, bias_ptr, small_ptr, out_ptr, seed_ptr,
    M, K, N, R, n_split,
    stride_am, stride_ak, stride_pr, stride_pk, stride_qn, stride_qr, stride_sm, stride_sr, stride_om, stride_on,
    scaling, threshold, drop_scale,
    IN_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    SHRINK_MODE: tl.constexpr, EXPAND_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """small[M, R] = drop(a)[M, K]·p[R, K]ᵀ (IN_DROPOUT) and out[M, N] = bias + s·small·q[N, R]ᵀ
    [⊙ keep·scale, OUT_DROPOUT] [+ out, ACCUMULATE], any strides.

    Program (pid_s, pid_m): the shrink of rows pid_m over all of K (kept in registers), then the
    expand onto every n_split-th BLOCK_N column block of out; programs pid_s > 0 recompute the shrink
    (from L2: the grid is (n_split, n_m), so the programs sharing rows run side by side) rather than
    wait for it, so small M still fills the GPU. Only pid_s == 0 stores small."""
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    rk = tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr) if IN_DROPOUT or OUT_DROPOUT else 0
    a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_am
    small = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        a = tl.load(a_rows + ks[None, :] * stride_ak, mask=m_ok[:, None] & (ks[None, :] < K), other=0.0)
        p = tl.load(p_ptr + rr[None, :] * stride_pr + ks[:, None] * stride_pk,
                    mask=r_ok[None, :] & (ks[:, None] < K), other=0.0)
        small = shrink_step(small, a, p, seed, rm, k0, threshold, IN_DROPOUT, SHRINK_MODE, PRECISION,
                            BLOCK_M, BLOCK_K)
    if IN_DROPOUT:
        small = small * drop_scale
    if pid_s == 0:
        tl.store(small_ptr + rm[:, None].to(tl.int64) * stride_sm + rr[None, :] * stride_sr, small,
                 mask=m_ok[:, None] & r_ok[None, :])
    l = small * scaling
    rn0 = tl.arange(0, BLOCK_N)
    out_rows = out_ptr + rm[:, None].to(tl.int64) * stride_om
    for n0 in range(pid_s * BLOCK_N, N, BLOCK_N * n_split):
        rn = n0 + rn0
        n_ok = rn < N
        q = tl.load(q_ptr + rn[None, :].to(tl.int64) * stride_qn + rr[:, None] * stride_qr,
                    mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        c = dot(l, q, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), EXPAND_MODE, PRECISION)
        if OUT_DROPOUT:
            c = tl.where(dropout_keep(seed, rm, n0, BLOCK_M, BLOCK_N, threshold), c * drop_scale, 0.0)
        if HAS_BIAS:
            c += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        omask = m_ok[:, None] & n_ok[None, :]
        if ACCUMULATE:  # out += ... (the q/k/v group's dX: one buffer, no autograd sum)
            c += tl.load(out_rows + rn[None, :] * stride_on, mask=omask, other=0.0).to(tl.float32)
        tl.store(out_rows + rn[None, :] * stride_on, c.to(out_ptr.dtype.element_ty), mask=omask)


def _shrink_expand_grid(M: int, N: int, BLOCK_R: int, sms: int, in_dropout: bool = False):
    """(BLOCK_M, BLOCK_K, BLOCK_N, n_split): the tallest row blocks that still give about every
    multiprocessor one; below that, the columns are split across programs that each redo their rows'
    shrink from L2. BLOCK_M·BLOCK_R fp32 stays in registers. K steps of 128 at R <= 32, but 64 with
    dropout on the input (the mask's registers); there the split is also dropped once the rows alone
    fill half the GPU, since every split program would redo the mask's Philox work in its shrink."""
    if INTERPRETING:
        BLOCK_M, BLOCK_K, BLOCK_N = 16, 32, 32
    else:
        BLOCK_M = next((bm for bm in (64, 32) if 4 * cdiv(M, bm) >= 3 * sms), 16)
        BLOCK_M = max(16, min(BLOCK_M, 4096 // BLOCK_R))
        BLOCK_K = (64 if in_dropout else 128) if BLOCK_R <= 32 else (64 if BLOCK_R <= 64 else 32)
        BLOCK_N = max(16, min(128, 4096 // BLOCK_R))
    n_m = cdiv(M, BLOCK_M)
    n_split = 1 if in_dropout and 2 * n_m >= sms else max(1, min(cdiv(N, BLOCK_N), cdiv(sms, n_m)))
    return BLOCK_M, BLOCK_K, BLOCK_N, n_split


def lora_shrink_expand(a: torch.Tensor, p: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None, scaling: float,
                       seed: torch.Tensor | None = None, threshold: int = 0, drop_scale: float = 1.0,
                       mask_output: bool = False, out_dtype: torch.dtype | None = None,
                       accumulate: torch.Tensor | None = None):
    """(out, small): small = drop(a)·pᵀ (M, R) fp32 and out = bias + s·small·qᵀ [⊙ keep] (M, N).

    a (M, K), p (R, K), q (N, R), bias (N,) or None; any strides. With ``seed`` the dropout mask is
    applied to ``a`` inside the shrink, or with ``mask_output`` to out's elements (m, n) instead.
    With ``accumulate`` (M, N) the result is added into that tensor, which is returned as out.
    """
    key = (_lora_shrink_expand_kernel, a.shape, a.stride(), a.dtype, p.shape, p.stride(), p.dtype, q.shape, q.stride(),
           q.dtype, None if bias is None else (bias.shape, bias.dtype), None if seed is None else seed.dtype,
           mask_output, out_dtype, scaling, threshold, drop_scale, fp32_precision(),
           None if accumulate is None else (accumulate.shape, accumulate.stride(), accumulate.dtype), a.device)
    return cached(key, _shrink_expand_plan, a, p, q, bias, scaling, seed is not None, threshold, drop_scale,
                  mask_output, out_dtype, accumulate)(a, p, q, bias, seed, accumulate)


def _shrink_expand_plan(a, p, q, bias, scaling, has_seed, threshold, drop_scale, mask_output, out_dtype, accumulate):
    """lora_shrink_expand's work for one shape key: the checks, the tiles, the grid, once."""
    M, K = a.shape
    R, Kp = p.shape
    N, Rq = q.shape
    if Kp != K or Rq != R:
        raise ValueError(f"lora_shrink_expand: a {tuple(a.shape)}, p {tuple(p.shape)} and q {tuple(q.shape)} do not "
                         f"fit a (M, K), p (R, K), q (N, R)")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"lora_shrink_expand: bias must be ({N},), got {tuple(bias.shape)}")
    out_dtype = out_dtype or (a.dtype if accumulate is None else accumulate.dtype)
    if accumulate is not None and (tuple(accumulate.shape) != (M, N) or accumulate.dtype != out_dtype):
        raise ValueError(f"lora_shrink_expand: accumulate must be ({M}, {N}) {out_dtype}, got "
                         f"{tuple(accumulate.shape)} {accumulate.dtype}")
    out_strides = (N, 1) if accumulate is None else accumulate.stride()
    device = a.device
    BLOCK_R = block_r(R, 1 << 30)
    in_dropout = has_seed and not mask_output
    BLOCK_M, BLOCK_K, BLOCK_N, n_split = _shrink_expand_grid(M, N, BLOCK_R, num_sms(device), in_dropout)
    plan = Plan(_lora_shrink_expand_kernel, (n_split, cdiv(M, BLOCK_M)), (
        M, K, N, R, n_split, *a.stride(), *p.stride(), *q.stride(), R, 1, *out_strides,
        float(scaling), threshold, float(drop_scale),
    ), IN_DROPOUT=in_dropout, OUT_DROPOUT=has_seed and mask_output,
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate is not None, SHRINK_MODE=dot_mode(a.dtype, p.dtype),
        EXPAND_MODE=expand_mode(out_dtype),
        PRECISION=fp32_precision(),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
        num_warps=4, num_stages=3,
    )

    def run(a, p, q, bias, seed, accumulate):
        small = torch.empty((M, R), dtype=torch.float32, device=device)
        out = torch.empty((M, N), dtype=out_dtype, device=device) if accumulate is None else accumulate
        if M:
            plan.run((a, p, q, q if bias is None else bias, small, out, small if seed is None else seed))
        return out, small

    return run
