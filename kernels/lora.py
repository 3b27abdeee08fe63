"""Fused LoRA kernels: shrink, linear + LoRA epilogue, adapter-weight gradients.

The LoRA linear y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ and its backward are built from three kernels:

* ``lora_shrink``       out[M, R]  = drop(x)[M, K] · A[R, K]ᵀ                          (fp32 out)
      forward: xa = drop(x)·Aᵀ (the dropout mask regenerated from the seed, never stored);
      backward: dyb = dY·B (A := Bᵀ, no dropout).
* ``lora_linear``       out[M, N]  = a[M, K] · w[N, K]ᵀ + b + (s·l[M, R] · r[N, R]ᵀ) [⊙ keep/(1-p)]
      forward: a = x, w = W, l = xa, r = B — the expand, scaling and bias live in the epilogue of
      the main matmul, so no M×N or M×K intermediate is written besides y;
      backward: dX = dY·W + s·(dyb·A) ⊙ keep/(1-p): a = dY, w = Wᵀ, l = dyb, r = Aᵀ, the dropout
      mask applied on the output coordinates (m, k) — the same bits the forward used on x;
      without a base (``w`` None) it writes C = b + s·l·rᵀ, onto which cuBLAS adds a·wᵀ (beta = 1).
* ``lora_adapter_grads`` dA[R, K] = s·dybᵀ·drop(x) and dB[N, R] = s·dYᵀ·xa in one launch
      (each out[C, R] = s · Σ_m big[m, C]ᵀ · small[m, R]; the mask regenerated on x).

All strides are passed, so transposed views (fan_in_fan_out / Conv1D weights, Wᵀ, Aᵀ, Bᵀ) and
non-contiguous activations cost nothing. Accumulation is fp32; row offsets are int64 (M·K can
pass 2³¹). Operands are cast to the activation dtype before ``tl.dot``, except that the LoRA
products run in fp32 when the adapters are fp32 (PEFT's autocast_adapter_dtype) and everything
runs in fp32 under the Triton interpreter when the data is bf16 (its bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dropout import dropout_keep
from .launch import INTERPRETING as _INTERPRETING
from .launch import launch


def _dot_fp32(*dtypes) -> bool:
    """Run a tl.dot in fp32 when any operand is fp32, or bf16 under the interpreter."""
    return any(d == torch.float32 for d in dtypes) or (_INTERPRETING and torch.bfloat16 in dtypes)


def _precision() -> str:
    """Precision of the fp32 dots (fp32 adapters or activations): what torch uses for an fp32 matmul.

    Plain tf32 when torch allows tf32 matmuls; otherwise tf32x3 (three tf32 tensor-core products,
    fp32-accurate: measured on an H100 1.6e-7 relative error against 4.0e-4 for tf32 and 3e-7 for
    the non-tensor-core "ieee"), so fp32 adapters get the gradients PEFT's fp32 matmuls give.
    """
    return "tf32" if torch._C._get_cublas_allow_tf32() else "tf32x3"  # = torch.backends.cuda.matmul.allow_tf32


def _cdiv(a: int, b: int) -> int:
    """Ceiling division in plain Python (triton.cdiv is a jit function: slow to call from the host)."""
    return -(-a // b)


def _block_r(R: int, cap: int = 256) -> int:
    return max(16, min(cap, 1 << max(0, R - 1).bit_length()))


# ------------------------------------------------------------------------------------------
# shrink: out[M, R] = drop(x)[M, K] · A[R, K]ᵀ
# ------------------------------------------------------------------------------------------
@triton.jit
def _shrink_step(acc, x, a, seed, rows, k0, threshold, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step of the shrink: acc[BLOCK_M, R] + drop(x)[BLOCK_M, BLOCK_K] · a[BLOCK_K, R], the
    mask of x's columns k0 .. k0 + BLOCK_K regenerated from the seed (the shrink kernel and the
    K loop of the linear kernel share it)."""
    if HAS_DROPOUT:
        x = tl.where(dropout_keep(seed, rows, k0, BLOCK_M, BLOCK_K, threshold), x, 0.0)
    if DOT_FP32:
        acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(x, a.to(x.dtype), acc)
    return acc


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, seed_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
    threshold, drop_scale,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
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
        acc = _shrink_step(acc, x, a, seed, rm, k0, threshold, HAS_DROPOUT, DOT_FP32, PRECISION, BLOCK_M, BLOCK_K)
    if HAS_DROPOUT:
        acc = acc * drop_scale
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rr[None, :] * stride_or
    omask = (rm[:, None] < M) & (rr[None, :] < R)
    if SPLIT_K == 1:
        tl.store(out, acc, mask=omask)
    else:
        tl.atomic_add(out, acc, mask=omask, sem="relaxed")


def lora_shrink(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor | None = None, threshold: int = 0,
                drop_scale: float = 1.0) -> torch.Tensor:
    """drop(x) · aᵀ in fp32: x (M, K), a (R, K) (any strides) -> (M, R) fp32.

    Dropout is applied when ``seed`` is given (threshold/scale from fastpeft.reference).
    """
    M, K = x.shape
    R, Ka = a.shape
    if Ka != K:
        raise ValueError(f"lora_shrink: x is (M={M}, K={K}) but A is (R={R}, K={Ka})")
    BLOCK_R = _block_r(R)
    BLOCK_M = min(16 if M <= 16 else (32 if M <= 32 else 64), max(16, 8192 // BLOCK_R))
    BLOCK_K = 128 if M <= 64 else 64
    n_m = max(1, _cdiv(M, BLOCK_M))
    # small M: split K across programs so the whole GPU reads x and A
    split_k = 1 if M > 256 or _INTERPRETING else max(1, min(_cdiv(K, BLOCK_K), 128 // n_m))
    out = (torch.zeros if split_k > 1 else torch.empty)((M, R), dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    has_dropout = seed is not None
    launch(_lora_shrink_kernel, (n_m, split_k), (
        x, a, out, seed if has_dropout else out,
        M, K, R,
        *x.stride(), *a.stride(), *out.stride(),
        threshold, drop_scale,
    ), HAS_DROPOUT=has_dropout, DOT_FP32=_dot_fp32(x.dtype, a.dtype), PRECISION=_precision(), SPLIT_K=split_k,
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
        num_warps=4, num_stages=3,
    )
    return out


# ------------------------------------------------------------------------------------------
# linear + LoRA epilogue: out[M, N] = a·wᵀ + bias + (s·l·rᵀ) [⊙ keep·scale]
# ------------------------------------------------------------------------------------------
@triton.jit
def _lora_linear_kernel(
    a_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, out_ptr, seed_ptr, sa_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wn, stride_wk,
    stride_lm, stride_lr, stride_rn, stride_rr, stride_om, stride_on, stride_sar, stride_sak,
    scaling, threshold, drop_scale,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_OUT: tl.constexpr,
    FUSE_SHRINK: tl.constexpr, IN_DROPOUT: tl.constexpr, SHRINK_FP32: tl.constexpr,
    DOT_FP32: tl.constexpr, LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row-blocks share the same W column-blocks while they sit in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # FUSE_SHRINK: xa = drop(a)·saᵀ accumulated in the same K loop (a is read once), kept in
    # registers for the epilogue and written to l_ptr by the pid_n == 0 programs (R <= BLOCK_R)
    rs = tl.arange(0, BLOCK_R)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    seed = tl.load(seed_ptr) if IN_DROPOUT else 0

    if HAS_BASE:
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
        w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk
        sa_ptrs = sa_ptr + rs[None, :] * stride_sar + rk[:, None] * stride_sak
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, w.to(a.dtype), acc)
            if FUSE_SHRINK:
                sa = tl.load(sa_ptrs, mask=k_ok[:, None] & (rs[None, :] < R), other=0.0)
                xa = _shrink_step(xa, a, sa, seed, rm, k0, threshold, IN_DROPOUT, SHRINK_FP32, PRECISION,
                                  BLOCK_M, BLOCK_K)
                sa_ptrs += BLOCK_K * stride_sak
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        if FUSE_SHRINK:
            if IN_DROPOUT:
                xa = xa * drop_scale
            if pid_n == 0:
                tl.store(l_ptr + rm[:, None].to(tl.int64) * stride_lm + rs[None, :] * stride_lr, xa,
                         mask=m_ok[:, None] & (rs[None, :] < R))

    # LoRA expand in the epilogue: (s·l)[BLOCK_M, R] · rᵀ[R, BLOCK_N], R in chunks of BLOCK_R. Without
    # a mask it accumulates straight into acc (a second fp32 tile would spill the large configs).
    if MASK_OUT:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        lora = acc
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):  # not pipelined: fp32 chunks would overflow smem
        rr = r0 + tl.arange(0, BLOCK_R)
        if FUSE_SHRINK:  # one chunk (R <= BLOCK_R), already in registers
            l = xa * scaling
        else:
            l = tl.load(l_ptr + rm[:, None].to(tl.int64) * stride_lm + rr[None, :] * stride_lr,
                        mask=m_ok[:, None] & (rr[None, :] < R), other=0.0) * scaling
        r = tl.load(r_ptr + rn[None, :].to(tl.int64) * stride_rn + rr[:, None] * stride_rr,
                    mask=n_ok[None, :] & (rr[:, None] < R), other=0.0)
        if LORA_FP32:
            lora = tl.dot(l.to(tl.float32), r.to(tl.float32), lora, input_precision=PRECISION)
        else:
            lora = tl.dot(l.to(r.dtype), r, lora)
    if MASK_OUT:
        keep = dropout_keep(tl.load(seed_ptr), rm, pid_n * BLOCK_N, BLOCK_M, BLOCK_N, threshold)
        acc += tl.where(keep, lora * drop_scale, 0.0)
    else:
        acc = lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    omask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


# Tile configs by M bucket, measured on an H100 (bench/bench_lora.py --tune): data, not code.
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); FASTPEFT_LINEAR_CONFIG pins one.
# H100, K = N = 4096, r = 16 (2026-11-23): M=1 28.5 us, M=16 23.1 us (F.linear 23.2), M=256 33.5 us
# (F.linear 27.4), M=4096 0.276 ms (F.linear 0.188), M=16384 1.175 ms (F.linear 0.814).
LINEAR_CONFIGS = {
    16: (16, 32, 128, 8, 4, 5),
    64: (64, 64, 128, 8, 4, 4),
    256: (64, 128, 128, 8, 4, 3),
    "large": (128, 128, 64, 8, 8, 4),
}
_INTERPRETER_CONFIG = (16, 32, 32, 4, 4, 1)


def _linear_config(M: int) -> tuple:
    pinned = os.environ.get("FASTPEFT_LINEAR_CONFIG")
    if pinned:
        return tuple(int(v) for v in pinned.split(","))
    if _INTERPRETING:
        return _INTERPRETER_CONFIG
    for bound in (16, 64, 256):
        if M <= bound:
            return LINEAR_CONFIGS[bound]
    return LINEAR_CONFIGS["large"]


def lora_linear(a: torch.Tensor, w: torch.Tensor | None, bias: torch.Tensor | None, l: torch.Tensor,
                r: torch.Tensor, scaling: float,
                seed: torch.Tensor | None = None, threshold: int = 0, drop_scale: float = 1.0,
                out_dtype: torch.dtype | None = None, shrink_a: torch.Tensor | None = None) -> torch.Tensor:
    """out = a·wᵀ + bias + s·(l·rᵀ) [⊙ keep·scale].

    a (M, K), w (N, K) or None (no base matmul), bias (N,) or None, l (M, R), r (N, R); any strides.
    With ``seed`` the LoRA term is masked by the dropout keep mask of output element (m, n).
    With ``shrink_a`` (R, K), R <= 64, the kernel computes l = drop(a)·shrink_aᵀ itself in its main
    loop (a read once) and writes it into ``l`` (fp32); ``seed`` then drops a, as the shrink does.
    """
    M, R = l.shape
    N, Rr = r.shape
    if Rr != R:
        raise ValueError(f"lora_linear: l is (M={M}, R={R}) but r is (N={N}, R={Rr})")
    K = 0
    if w is not None:
        Ma, K = a.shape
        Nw, Kw = w.shape
        if Ma != M or Nw != N or Kw != K:
            raise ValueError(f"lora_linear: a {tuple(a.shape)}, w {tuple(w.shape)}, l {tuple(l.shape)} and r "
                             f"{tuple(r.shape)} do not fit a (M, K), w (N, K), l (M, R), r (N, R)")
    fuse = shrink_a is not None
    if fuse and (w is None or tuple(shrink_a.shape) != (R, K) or R > 64 or l.dtype != torch.float32):
        raise ValueError(f"lora_linear: the fused shrink needs a base, shrink_a ({R}, {K}) with R <= 64 and an "
                         f"fp32 l; got shrink_a {tuple(shrink_a.shape)}, l {l.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"lora_linear: bias must be ({N},), got {tuple(bias.shape)}")
    dtype = out_dtype or (a.dtype if w is not None else l.dtype)
    out = torch.empty((M, N), dtype=dtype, device=l.device)
    if M == 0 or N == 0:
        return out
    BM, BN, BK, GM, warps, stages = _linear_config(M)
    BLOCK_R = _block_r(R, 64)
    has_base = w is not None
    if has_base:  # fp32 operands take twice the shared memory per stage: drop stages to fit (H100: 227 KiB)
        stage_bytes = (BM + BN) * BK * max(a.element_size(), w.element_size())
        stage_bytes += BK * BLOCK_R * shrink_a.element_size() if fuse else 0
        while stages > 1 and stages * stage_bytes > 200 * 1024:
            stages -= 1
    base_dtypes = (a.dtype, w.dtype) if has_base else ()
    sa = shrink_a if fuse else l
    grid = (_cdiv(M, BM) * _cdiv(N, BN),)
    launch(_lora_linear_kernel, grid, (
        a if has_base else l, w if has_base else l, bias if bias is not None else l, l, r, out,
        seed if seed is not None else l, sa,
        M, N, K, R,
        *(a.stride() if has_base else (0, 0)), *(w.stride() if has_base else (0, 0)),
        *l.stride(), *r.stride(), *out.stride(), *sa.stride(),
        scaling, threshold, drop_scale,
    ), HAS_BASE=has_base, HAS_BIAS=bias is not None, MASK_OUT=seed is not None and not fuse,
        FUSE_SHRINK=fuse, IN_DROPOUT=seed is not None and fuse,
        SHRINK_FP32=fuse and _dot_fp32(a.dtype, shrink_a.dtype),
        DOT_FP32=_dot_fp32(*base_dtypes), LORA_FP32=_dot_fp32(l.dtype, r.dtype),
        PRECISION=_precision(),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=BLOCK_R, GROUP_M=GM,
        num_warps=warps, num_stages=stages,
    )
    return out


# ------------------------------------------------------------------------------------------
# adapter gradients, both in one launch:
#   problem 0: dA[R, K] = s·drop_scale · Σ_m (dyb[m, R])ᵀ ⊗ drop(x)[m, K]   (stored transposed)
#   problem 1: dB[N, R] = s · Σ_m dY[m, N]ᵀ · xa[m, R]
# Each is out[C, R] = scale · Σ_m big[m, C]ᵀ · small[m, R]; programs 0 .. n_c0-1 take problem 0.
# ------------------------------------------------------------------------------------------
@triton.jit
def _lora_weight_grad_kernel(
    big0_ptr, small0_ptr, out0_ptr, big1_ptr, small1_ptr, out1_ptr, seed_ptr,
    M, C0, C1, R, N_C0,
    s_b0m, s_b0c, s_s0m, s_s0r, s_o0c, s_o0r,
    s_b1m, s_b1c, s_s1m, s_s1r, s_o1c, s_o1r,
    scale0, scale1, threshold,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, SPLIT_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    first = pid_c < N_C0  # problem 0 (dropout applies to it alone)
    if first:
        big_ptr, small_ptr, out_ptr, C, scale = big0_ptr, small0_ptr, out0_ptr, C0, scale0
        s_bm, s_bc, s_sm, s_sr, s_oc, s_or = s_b0m, s_b0c, s_s0m, s_s0r, s_o0c, s_o0r
    else:
        pid_c -= N_C0
        big_ptr, small_ptr, out_ptr, C, scale = big1_ptr, small1_ptr, out1_ptr, C1, scale1
        s_bm, s_bc, s_sm, s_sr, s_oc, s_or = s_b1m, s_b1c, s_s1m, s_s1r, s_o1c, s_o1r
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm0 = tl.arange(0, BLOCK_M)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, BLOCK_M * SPLIT_M):
        rm = m0 + rm0
        m_ok = rm < M
        big = tl.load(big_ptr + rm[:, None].to(tl.int64) * s_bm + rc[None, :] * s_bc,
                      mask=m_ok[:, None] & (rc[None, :] < C), other=0.0)
        small = tl.load(small_ptr + rm[:, None].to(tl.int64) * s_sm + rr[None, :] * s_sr,
                        mask=m_ok[:, None] & (rr[None, :] < R), other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rm, pid_c * BLOCK_C, BLOCK_M, BLOCK_C, threshold)
            big = tl.where(keep | (tl.program_id(0) >= N_C0), big, 0.0)
        if DOT_FP32:
            acc = tl.dot(tl.trans(big.to(tl.float32)), small.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(big), small.to(big.dtype), acc)
    acc = acc * scale
    out = out_ptr + rc[:, None] * s_oc + rr[None, :] * s_or
    omask = (rc[:, None] < C) & (rr[None, :] < R)
    if SPLIT_M == 1:
        tl.store(out, acc, mask=omask)
    else:
        tl.atomic_add(out, acc, mask=omask, sem="relaxed")


def lora_adapter_grads(x: torch.Tensor | None, dyb: torch.Tensor | None, dy: torch.Tensor | None,
                       xa: torch.Tensor | None, scaling: float, seed: torch.Tensor | None = None,
                       threshold: int = 0, drop_scale: float = 1.0):
    """(dA, dB) in fp32 from one launch: dA = s·dybᵀ·drop(x) (R, K), dB = s·dYᵀ·xa (N, R).

    x (M, K), dyb (M, R), dy (M, N), xa (M, R), any strides; pass x/dyb None to skip dA, dy/xa None
    to skip dB. The dropout mask (``seed``) is the forward's, regenerated on x's coordinates.
    """
    problems = [p for p in ((x, dyb, True), (dy, xa, False)) if p[0] is not None]
    if not problems:
        return None, None
    M = problems[0][0].shape[0]
    R = problems[0][1].shape[1]
    for big, small, _ in problems:
        if big.shape[0] != M or small.shape[0] != M or small.shape[1] != R:
            raise ValueError(f"lora_adapter_grads: {tuple(big.shape)} and {tuple(small.shape)} do not fit "
                             f"(M={M}, C) and (M={M}, R={R})")
    if len(problems) == 2 and x.dtype != dy.dtype:  # one launch needs one activation dtype
        return (lora_adapter_grads(x, dyb, None, None, scaling, seed, threshold, drop_scale)[0],
                lora_adapter_grads(None, None, dy, xa, scaling)[1])
    BLOCK_M, BLOCK_C = (16, 32) if _INTERPRETING else (64, 128)
    n_cs = [_cdiv(big.shape[1], BLOCK_C) for big, _, _ in problems]
    n_c = sum(n_cs)
    split_m = 1 if _INTERPRETING else max(1, min(_cdiv(M, BLOCK_M), 264 // max(1, n_c)))
    # zeroed when programs add partial sums; separate tensors (gradients must not share storage)
    alloc = torch.zeros if split_m > 1 or M == 0 else torch.empty
    outs = [alloc((R, big.shape[1]) if is_a else (big.shape[1], R), dtype=torch.float32, device=big.device)
            for big, _, is_a in problems]
    if M == 0 or n_c == 0:
        return _assign(problems, outs)
    args = []
    for (big, small, is_a), out in zip(problems, outs):
        s_oc, s_or = out.stride()[::-1] if is_a else out.stride()
        args.append((big, small, out, *big.stride(), *small.stride(), s_oc, s_or,
                     scaling * (drop_scale if is_a and seed is not None else 1.0)))
    if len(args) == 1:
        args.append(args[0])
    (b0, s0, o0, *st0, sc0), (b1, s1, o1, *st1, sc1) = args
    has_dropout = seed is not None and problems[0][2]
    BLOCK_R = _block_r(R, 64)
    C0 = problems[0][0].shape[1]
    C1 = problems[-1][0].shape[1]
    launch(_lora_weight_grad_kernel, (n_c, split_m, _cdiv(R, BLOCK_R)), (
        b0, s0, o0, b1, s1, o1, seed if has_dropout else o0,
        M, C0, C1, R, n_cs[0],
        *st0, *st1, sc0, sc1, threshold,
    ), HAS_DROPOUT=has_dropout, DOT_FP32=_dot_fp32(b0.dtype, s0.dtype, b1.dtype, s1.dtype), PRECISION=_precision(),
        SPLIT_M=split_m, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R,
        num_warps=4, num_stages=3,
    )
    return _assign(problems, outs)


def _assign(problems, outs):
    res = {is_a: out for (_, _, is_a), out in zip(problems, outs)}
    return res.get(True), res.get(False)
