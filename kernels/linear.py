"""The LoRA linear as one matmul with the LoRA term in its epilogue:

    out[M, N] = a[M, K] · w[N, K]ᵀ + bias + s·(l[M, R] · r[N, R]ᵀ) [⊙ keep·scale]

so no M×N or M×K intermediate is written besides out. Forward: a = x, w = W, l = xa = drop(x)·Aᵀ,
r = B. dX: a = dY, w = Wᵀ, l = dyb = dY·B, r = Aᵀ, the dropout mask on the LoRA term of output
element (m, k). ``l`` may come as the split-K partial sums of ``lora_shrink(partial=True)``, which
the epilogue adds up (their sum is returned for the backward).

* ``lora_linear``      a Triton matmul, any strides; may be launched with PDL behind the shrink
                       that writes l (its main loop runs while the shrink finishes).
* ``lora_linear_tma``  a persistent matmul whose a and w tiles come in by TMA (Hopper on, half-
                       precision operands, ``tma_ok``): the ``tma`` route. ``tma_wide`` says whether
                       it runs its wide tiles for an output (the auto route takes it only then).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .common import (block_r, device_props, dot, dot_mode, expand_mode, fit_stages, fp32_precision, gdc_wait,
                     num_sms, pdl_meta)
from .configs import DEFAULT_FAMILY, TMA_CONFIGS, for_device, linear_config, tma_config_name
from .dropout import dropout_keep
from .launch import INTERPRETING, DescriptorPlan, Plan, cached, cdiv


@triton.jit
def _lora_epilogue(acc, rm, rn, m_ok, n_ok, col0, l_ptr, r_ptr, bias_ptr, lsum_ptr, seed, R,
                   stride_lm, stride_lr, stride_rn, stride_rr, stride_ls, write_lsum, scaling, threshold,
                   drop_scale, HAS_BIAS: tl.constexpr, OUT_DROPOUT: tl.constexpr,
                   L_SPLIT: tl.constexpr, EXPAND_MODE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] + s·(l·rᵀ) [⊙ keep·scale, the mask of output columns col0 ..] + bias.

    l may be L_SPLIT partial sums stride_ls apart, added in order (their sum is stored at lsum_ptr
    where ``write_lsum``). R runs in chunks of BLOCK_R. Without a mask the product accumulates
    straight into acc (a second fp32 tile would spill the large tiles)."""
    if OUT_DROPOUT:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        lora = acc
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):  # not pipelined: fp32 chunks would overflow smem
        rr = r0 + tl.arange(0, BLOCK_R)
        l_ptrs = l_ptr + rm[:, None].to(tl.int64) * stride_lm + rr[None, :] * stride_lr
        l_ok = m_ok[:, None] & (rr[None, :] < R)
        l = tl.load(l_ptrs, mask=l_ok, other=0.0)
        for s in range(1, L_SPLIT):  # the shrink's split-K partial sums, added in a fixed order
            l += tl.load(l_ptrs + s * stride_ls, mask=l_ok, other=0.0)
        if L_SPLIT > 1:
            if write_lsum:  # their sum, kept for the backward
                tl.store(lsum_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], l, mask=l_ok)
        l = l * scaling
        r = tl.load(r_ptr + rn[None, :].to(tl.int64) * stride_rn + rr[:, None] * stride_rr,
                    mask=n_ok[None, :] & (rr[:, None] < R), other=0.0)
        lora = dot(l, r, lora, EXPAND_MODE, PRECISION)
    if OUT_DROPOUT:
        keep = dropout_keep(seed, rm, col0, BLOCK_M, BLOCK_N, threshold)
        acc += tl.where(keep, lora * drop_scale, 0.0)
    else:
        acc = lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``tile`` in grouped order: GROUP_M row blocks share the same W
    column blocks while they sit in L2."""
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % group_size, (tile % group) // group_size


@triton.jit
def tma_tile(a_desc, w_desc, tile, num_m, num_n, K, W_KMAJOR: tl.constexpr, MODE: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             GROUP_M: tl.constexpr):
    """The persistent TMA matmuls' main loop for one output tile (grouped order): (off_m, off_n, the fp32
    tile of a·wᵀ). a (M, K) and w by TMA descriptors, w as (N, K) when W_KMAJOR, else its (K, N)
    transpose."""
    pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        k0 = ki * BLOCK_K
        a = a_desc.load([off_m, k0])
        if W_KMAJOR:  # w (N, K) row-major: its tile [BLOCK_N, BLOCK_K], transposed in smem
            w = w_desc.load([off_n, k0]).T
        else:  # w given as its (K, N) row-major transpose: tile [BLOCK_K, BLOCK_N]
            w = w_desc.load([k0, off_n])
        acc = dot(a, w, acc, MODE, PRECISION)
    return off_m, off_n, acc


@triton.jit
def _lora_linear_kernel(
    a_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, out_ptr, seed_ptr, lsum_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wn, stride_wk,
    stride_lm, stride_lr, stride_rn, stride_rr, stride_om, stride_on, stride_ls,
    scaling, threshold, drop_scale,
    HAS_BIAS: tl.constexpr, OUT_DROPOUT: tl.constexpr,
    MODE: tl.constexpr, EXPAND_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, L_SPLIT: tl.constexpr, PDL_WAIT: tl.constexpr,
):
    """out[M, N] = a[M, K]·w[N, K]ᵀ + bias + s·(l[M, R]·r[N, R]ᵀ) [⊙ keep·scale], any strides; one
    program per BLOCK_M x BLOCK_N output tile in grouped order, the epilogue (``_lora_epilogue``) on
    the fp32 accumulator before the one store."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    seed = tl.load(seed_ptr) if OUT_DROPOUT else 0

    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot(a, w, acc, MODE, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # the LoRA expand, mask and bias in the epilogue
    if PDL_WAIT:  # launched with PDL behind the shrink that writes l: wait for it here, not earlier
        gdc_wait()
    acc = _lora_epilogue(acc, rm, rn, m_ok, n_ok, pid_n * BLOCK_N, l_ptr, r_ptr, bias_ptr, lsum_ptr, seed, R,
                         stride_lm, stride_lr, stride_rn, stride_rr, stride_ls, pid_n == 0, scaling, threshold,
                         drop_scale, HAS_BIAS, OUT_DROPOUT, L_SPLIT, EXPAND_MODE, PRECISION,
                         BLOCK_M, BLOCK_N, BLOCK_R)
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    omask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _partials(l: torch.Tensor) -> tuple:
    """(partial, S, one (M, R) slice) of the expand's ``l``, as both matmul launchers take it: the
    (S, M, R) split-K partial sums of ``lora_shrink(partial=True)``, or a plain (M, R) l (S = 1)."""
    partial = l.dim() == 3
    l_split = l.shape[0] if partial else 1
    return partial, l_split, (l[0] if partial and l_split else l)


def _lsum(l: torch.Tensor, partial: bool, l_split: int, M: int, R: int) -> torch.Tensor:
    """Where the epilogue stores the sum of more than one partial sum (for the backward), else the
    one (M, R) l itself; the launcher returns it beside out when ``l`` came as partial sums."""
    return torch.empty((M, R), dtype=l.dtype, device=l.device) if l_split > 1 else (l[0] if partial else l)


def lora_linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor,
                r: torch.Tensor, scaling: float,
                seed: torch.Tensor | None = None, threshold: int = 0, drop_scale: float = 1.0,
                out_dtype: torch.dtype | None = None, mask_output: bool = False, pdl: bool = False) -> torch.Tensor:
    """out = a·wᵀ + bias + s·(l·rᵀ) [⊙ keep·scale].

    a (M, K), w (N, K), bias (N,) or None, l (M, R), r (N, R); any strides. ``l`` may be the (S, M, R)
    partial sums of ``lora_shrink(partial=True)``: the epilogue adds them up, and the call returns
    (out, their sum (M, R)). With ``seed`` (and ``mask_output``, which it needs) the dropout mask
    applies to the LoRA term of output element (m, n). ``pdl``: launched with programmatic dependent
    launch behind the kernel that writes l (see lora_linear_tma).
    """
    key = (_lora_linear_kernel, a.shape, a.stride(), a.dtype, w.shape, w.stride(), w.dtype,
           None if bias is None else (bias.shape, bias.dtype), l.shape, l.stride(), l.dtype, r.shape, r.stride(),
           r.dtype, None if seed is None else seed.dtype, threshold, drop_scale, out_dtype, mask_output, scaling,
           fp32_precision(), pdl, a.device)
    return cached(key, _linear_plan, a, w, bias, l, r, scaling, seed is not None, threshold, drop_scale, out_dtype,
                  mask_output, pdl)(a, w, bias, l, r, seed)


def _linear_plan(a, w, bias, l, r, scaling, has_seed, threshold, drop_scale, out_dtype, mask_output, pdl=False):
    """lora_linear's work for one shape key: the checks, the tiles, the grid, once."""
    partial, l_split, l2 = _partials(l)  # l2: one (M, R) slice, the checks and strides
    if partial and l_split < 1:
        raise ValueError(f"lora_linear: partial sums l {tuple(l.shape)} need S >= 1")
    M, R = l2.shape
    N, Rr = r.shape
    Ma, K = a.shape
    Nw, Kw = w.shape
    if Rr != R or Ma != M or Nw != N or Kw != K:
        raise ValueError(f"lora_linear: a {tuple(a.shape)}, w {tuple(w.shape)}, l {tuple(l.shape)} and r "
                         f"{tuple(r.shape)} do not fit a (M, K), w (N, K), l (M, R), r (N, R)")
    if has_seed and not mask_output:
        raise ValueError("lora_linear: dropout applies to the output's LoRA term only (mask_output=True)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"lora_linear: bias must be ({N},), got {tuple(bias.shape)}")
    out_dtype = out_dtype or a.dtype
    device = l.device
    BM, BN, BK, GM, warps, stages = tuning.pinned(tuning.LINEAR) or linear_config(M, device)
    BLOCK_R = block_r(R, 64)
    # fp32 operands take twice the shared memory per stage: drop stages to fit (H100: 227 KiB)
    stages = fit_stages(stages, (BM + BN) * BK * max(a.element_size(), w.element_size()), 200 * 1024)
    plan = Plan(_lora_linear_kernel, (cdiv(M, BM) * cdiv(N, BN),), (
        M, N, K, R, *a.stride(), *w.stride(), *l2.stride(), *r.stride(), N, 1,
        l.stride(0) if partial else 0, float(scaling), threshold, float(drop_scale),
    ), HAS_BIAS=bias is not None, OUT_DROPOUT=has_seed,
        MODE=dot_mode(a.dtype, w.dtype), EXPAND_MODE=expand_mode(out_dtype),
        PRECISION=fp32_precision(),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=BLOCK_R, GROUP_M=GM, L_SPLIT=l_split,
        num_warps=warps, num_stages=stages, **pdl_meta(pdl),
    )

    def run(a, w, bias, l, r, seed):
        out = torch.empty((M, N), dtype=out_dtype, device=device)
        lsum = _lsum(l, partial, l_split, M, R)
        if M and N:
            plan.run((a, w, l if bias is None else bias, l, r, out, l if seed is None else seed, lsum))
        elif l_split > 1:  # no output to compute, the sum still to hand back
            lsum = l.sum(0)
        return (out, lsum) if partial else out

    return run


# ------------------------------------------------------------------------------------------
# the same product as a persistent TMA matmul (Hopper): out = a·wᵀ + bias + s·(l·rᵀ) [⊙ keep·scale]
# ------------------------------------------------------------------------------------------
@triton.jit
def _lora_linear_tma_kernel(
    a_desc, w_desc, out_desc, bias_ptr, l_ptr, r_ptr, out_ptr, seed_ptr, lsum_ptr,
    M, N, K, R,
    stride_lm, stride_lr, stride_rn, stride_rr, stride_om, stride_ls,
    scaling, threshold, drop_scale,
    HAS_BIAS: tl.constexpr, OUT_DROPOUT: tl.constexpr, W_KMAJOR: tl.constexpr, TMA_STORE: tl.constexpr,
    ACCUMULATE: tl.constexpr, MODE: tl.constexpr, EXPAND_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    PDL_WAIT: tl.constexpr, L_SPLIT: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr,
):
    """out[M, N] = a·wᵀ + bias + s·(l·rᵀ) [⊙ keep·scale] [+ out, ACCUMULATE]: a (M, K) and w by TMA
    descriptors (w as (N, K) when W_KMAJOR, else its (K, N) transpose), out stored by TMA
    (TMA_STORE) or through out_ptr (row stride stride_om). Each program walks tiles pid,
    pid + NUM_PROGRAMS, ... in grouped order; the LoRA expand, mask and bias are added to the fp32
    tile in registers, on its two column halves with EPILOGUE_SPLIT."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    seed = tl.load(seed_ptr) if OUT_DROPOUT else 0
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        off_m, off_n, acc = tma_tile(a_desc, w_desc, tile, num_m, num_n, K, W_KMAJOR, MODE, PRECISION,
                                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        rm = off_m + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        if PDL_WAIT:  # launched with PDL behind the kernel that writes l: wait for it here, not earlier
            gdc_wait()
        ep = (out_desc, bias_ptr, l_ptr, r_ptr, out_ptr, seed, lsum_ptr, N, R, stride_lm, stride_lr, stride_rn,
              stride_rr, stride_om, stride_ls, scaling, threshold, drop_scale)
        if EPILOGUE_SPLIT:  # the epilogue on two column halves: half the mask's and the LoRA term's registers
            HALF: tl.constexpr = BLOCK_N // 2
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
            _tma_epilogue_store(acc0, rm, m_ok, off_m, off_n, off_n == 0, ep, HAS_BIAS, OUT_DROPOUT, TMA_STORE,
                                ACCUMULATE, EXPAND_MODE, PRECISION, BLOCK_M, HALF, BLOCK_R, L_SPLIT)
            _tma_epilogue_store(acc1, rm, m_ok, off_m, off_n + HALF, False, ep, HAS_BIAS, OUT_DROPOUT, TMA_STORE,
                                ACCUMULATE, EXPAND_MODE, PRECISION, BLOCK_M, HALF, BLOCK_R, L_SPLIT)
        else:
            _tma_epilogue_store(acc, rm, m_ok, off_m, off_n, off_n == 0, ep, HAS_BIAS, OUT_DROPOUT, TMA_STORE,
                                ACCUMULATE, EXPAND_MODE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, L_SPLIT)


@triton.jit
def _tma_epilogue_store(acc, rm, m_ok, off_m, col0, write_lsum, ep, HAS_BIAS: tl.constexpr,
                        OUT_DROPOUT: tl.constexpr, TMA_STORE: tl.constexpr, ACCUMULATE: tl.constexpr,
                        EXPAND_MODE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, L_SPLIT: tl.constexpr):
    """The TMA matmul's epilogue on the output columns col0 .. col0 + BLOCK_N of its tile: the LoRA
    term (``_lora_epilogue``), the buffer it is added into (ACCUMULATE), the store. ``ep``: the
    kernel's epilogue operands, one tuple for every call site."""
    (out_desc, bias_ptr, l_ptr, r_ptr, out_ptr, seed, lsum_ptr, N, R, stride_lm, stride_lr, stride_rn, stride_rr,
     stride_om, stride_ls, scaling, threshold, drop_scale) = ep
    rn = col0 + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = _lora_epilogue(acc, rm, rn, m_ok, n_ok, col0, l_ptr, r_ptr, bias_ptr, lsum_ptr, seed, R,
                         stride_lm, stride_lr, stride_rn, stride_rr, stride_ls, write_lsum, scaling, threshold,
                         drop_scale, HAS_BIAS, OUT_DROPOUT, L_SPLIT, EXPAND_MODE, PRECISION,
                         BLOCK_M, BLOCK_N, BLOCK_R)
    if ACCUMULATE:  # out += ... (the q/k/v group's dX: one buffer; TMA_STORE is set with it)
        acc += out_desc.load([off_m, col0]).to(tl.float32)
    if TMA_STORE:
        out_desc.store([off_m, col0], acc.to(out_desc.dtype))
    else:
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def tma_wide(out_dtype, has_seed: bool) -> bool:
    """Whether the TMA matmul runs its 128 x 256 tiles for this output on the GPU (the auto route
    takes the TMA matmul only then: its narrow tiles lost to cuBLAS onto a prefilled C). A config
    pinned by FASTPEFT_TMA_CONFIG (for measuring) is taken whatever its width."""
    # DEFAULT_FAMILY's table: the GPU's, also under the interpreter (whose tiles say nothing of it)
    return (tuning.pinned(tuning.TMA) is not None
            or TMA_CONFIGS[DEFAULT_FAMILY][tma_config_name(out_dtype, has_seed)][1] == 256)


def _tma_aligned(t: torch.Tensor) -> bool:
    """A 16-byte aligned base, and every stride but the unit one positive and a multiple of 16 bytes
    (a TMA descriptor takes no zero stride: expanded tensors, such as the dY of a sum, go elsewhere)."""
    return t.data_ptr() % 16 == 0 and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride() if s != 1)


def tma_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether lora_linear_tma takes a (M, K) and w (N, K): half precision, one dtype, unit stride along
    a's rows and along w's K or N, 16-byte aligned bases and row strides, a GPU with TMA (Hopper on)."""
    if a.dtype not in (torch.float16, torch.bfloat16) or w.dtype != a.dtype:
        return False
    if not INTERPRETING and not (a.is_cuda and device_props(a.device)[1] >= 9):
        return False
    return a.stride(1) == 1 and 1 in w.stride() and _tma_aligned(a) and _tma_aligned(w)


def lora_linear_tma(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor,
                    r: torch.Tensor, scaling: float, seed: torch.Tensor | None = None, threshold: int = 0,
                    drop_scale: float = 1.0, out_dtype: torch.dtype | None = None, mask_output: bool = False,
                    accumulate: torch.Tensor | None = None, config: tuple | None = None,
                    pdl: bool = False) -> torch.Tensor:
    """lora_linear's product as a persistent TMA matmul: out = a·wᵀ + bias + s·(l·rᵀ) [⊙ keep·scale,
    with ``mask_output``], added into ``accumulate`` (M, N) when given.

    a (M, K), w (N, K) with unit stride along K or along N (the dX form passes W's transpose view),
    both as ``tma_ok`` says; l (M, R), r (N, R) any strides; bias (N,) or None. As with lora_linear,
    ``l`` may be the (S, M, R) partial sums of ``lora_shrink(partial=True)``; the call then returns
    (out, their sum (M, R)). ``config`` overrides the tile config (configs.TMA_CONFIGS' form). With
    ``pdl`` the kernel is launched with programmatic dependent launch behind the kernel that writes l
    (``lora_shrink`` with launch_dependents): its main loop runs while that one finishes, and it
    waits before the epilogue reads l — so nothing else it reads may come from that kernel.
    """
    key = (_lora_linear_tma_kernel, a.shape, a.stride(), a.dtype, w.shape, w.stride(), w.dtype,
           None if bias is None else (bias.shape, bias.dtype), l.shape, l.stride(), l.dtype, r.shape, r.stride(),
           r.dtype, None if seed is None else seed.dtype, threshold, drop_scale, out_dtype, mask_output,
           None if accumulate is None else (accumulate.shape, accumulate.stride(), accumulate.dtype), scaling,
           fp32_precision(), config, pdl, a.device)
    return cached(key, _tma_plan, a, w, bias, l, r, scaling, seed is not None, threshold, drop_scale, out_dtype,
                  mask_output, accumulate, config, pdl)(a, w, bias, l, r, seed, accumulate)


def _tma_plan(a, w, bias, l, r, scaling, has_seed, threshold, drop_scale, out_dtype, mask_output, accumulate,
              config, pdl=False):
    """lora_linear_tma's work for one shape key: the checks, the tiles, the grid and the descriptors'
    shapes, once (``launch.DescriptorPlan`` keeps the descriptors and the direct launch)."""
    partial, l_split, l2 = _partials(l)  # l2: one (M, R) slice, the checks and strides
    M, K = a.shape
    N, R = r.shape
    if tuple(w.shape) != (N, K) or tuple(l2.shape) != (M, R):
        raise ValueError(f"lora_linear_tma: a {tuple(a.shape)}, w {tuple(w.shape)}, l {tuple(l.shape)} and r "
                         f"{tuple(r.shape)} do not fit a (M, K), w (N, K), l (M, R) or (S >= 1, M, R), r (N, R)")
    if not tma_ok(a, w):
        raise ValueError(f"lora_linear_tma: a {a.dtype} strides {a.stride()} and w {w.dtype} strides {w.stride()} "
                         f"are not TMA operands (one half dtype, unit inner stride, 16-byte aligned rows)")
    if has_seed and not mask_output:
        raise ValueError("lora_linear_tma: dropout applies to the output's LoRA term only (mask_output=True)")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"lora_linear_tma: bias must be ({N},), got {tuple(bias.shape)}")
    out_dtype = out_dtype or (a.dtype if accumulate is None else accumulate.dtype)
    if accumulate is not None and (tuple(accumulate.shape) != (M, N) or accumulate.dtype != out_dtype
                                   or accumulate.stride(1) != 1 or not _tma_aligned(accumulate)):
        raise ValueError(f"lora_linear_tma: accumulate must be ({M}, {N}) {out_dtype} with unit stride along N, "
                         f"got {tuple(accumulate.shape)} {accumulate.dtype} strides {accumulate.stride()}")
    device = a.device
    config = (config or tuning.pinned(tuning.TMA)
              or for_device(TMA_CONFIGS, device)[tma_config_name(out_dtype, has_seed)])
    BM, BN, BK, GM, warps, stages, tma_store, flatten, *extra = config
    split = len(extra) > 1 and bool(extra[1])
    kmajor = w.stride(1) == 1
    tiles = cdiv(M, BM) * cdiv(N, BN)
    programs = max(1, min(tiles, num_sms(device)))
    meta = dict(HAS_BIAS=bias is not None, OUT_DROPOUT=has_seed, W_KMAJOR=kmajor,
                TMA_STORE=tma_store or accumulate is not None, ACCUMULATE=accumulate is not None,
                MODE=dot_mode(a.dtype, w.dtype), EXPAND_MODE=expand_mode(out_dtype), PRECISION=fp32_precision(),
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=block_r(R, 64), GROUP_M=GM, NUM_PROGRAMS=programs,
                FLATTEN=flatten, WARP_SPECIALIZE=bool(extra and extra[0]) and not INTERPRETING, num_warps=warps,
                num_stages=stages, L_SPLIT=l_split, EPILOGUE_SPLIT=split)
    meta.update(pdl_meta(pdl))
    scalars = (M, N, K, R, *l2.stride(), *r.stride(), N, l.stride(0) if partial else 0, float(scaling), threshold,
               float(drop_scale))
    descriptors = (([M, K], [BM, BK], False),  # a (M, K)
                   ([N, K], [BN, BK], False) if kmajor else ([K, N], [BK, BN], True),  # w, or its (K, N) form
                   ([M, N], [BM, BN // 2 if split else BN], False))  # out (M, N)
    plan = DescriptorPlan(_lora_linear_tma_kernel, (programs,), descriptors, scalars, device, **meta)

    def run(a, w, bias, l, r, seed, accumulate):
        out = torch.empty((M, N), dtype=out_dtype, device=device) if accumulate is None else accumulate
        lsum = _lsum(l, partial, l_split, M, R)
        if M and N:
            plan.run((a, w, out), (l if bias is None else bias, l, r, out, l if seed is None else seed, lsum))
        elif l_split > 1:  # no output to compute, the sum still to hand back
            lsum = l.sum(0)
        return (out, lsum) if partial else out

    return run
