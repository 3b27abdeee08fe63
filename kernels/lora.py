"""Fused LoRA kernels: shrink, shrink + expand, linear + LoRA epilogue, adapter-weight gradients.

The LoRA linear y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ and its backward are built from these kernels:

* ``lora_shrink``        small[M, R] = drop(a)[M, K] · p[R, K]ᵀ                          (fp32 out)
      split over K at small M (partial sums that the matmul adds up, or atomics into a zeroed
      output), and with partial sums from 512 rows where its row blocks alone leave multiprocessors
      idle; the Triton and TMA routes' shrink, and dY·B where dX is not needed.
* ``lora_shrink_expand`` small = drop(a)·pᵀ (fp32, written) and out[M, N] = b + s·(small · qᵀ) [⊙ keep]
      in one pass over a block of rows: the cuBLAS route's C, onto which cuBLAS adds a·wᵀ (beta = 1).
      forward: a = x, p = A, q = B, dropout on x;  backward: a = dY, p = Bᵀ, q = Aᵀ, the dropout mask
      on the output (m, k) — the same bits the forward used on x; (small = dyb = dY·B).
* ``lora_linear``        out[M, N] = a[M, K] · w[N, K]ᵀ + b + s·(l[M, R] · r[N, R]ᵀ) [⊙ keep]
      the expand, scaling and bias in the epilogue of a Triton matmul, so no M×N or M×K intermediate
      is written besides y. It also takes the shrink's split-K partial sums and adds them in its epilogue, and may be
      launched with PDL behind the shrink (its main loop runs while the shrink finishes).
* ``lora_linear_tma``    the same product and epilogue as a persistent matmul whose
      a and w tiles come in by TMA (Hopper on, half-precision operands): the opt-in ``tma`` route.
* ``lora_adapter_grads`` dA[R, K] = s·dybᵀ·drop(x) and dB[N, R] = s·dYᵀ·xa in one launch
      (each out[C, R] = s · Σ_m big[m, C]ᵀ · small[m, R]; the mask regenerated on x).

All strides are passed, so transposed views (fan_in_fan_out / Conv1D weights, Wᵀ, Aᵀ, Bᵀ) and
non-contiguous activations cost nothing. Accumulation is fp32; row offsets are int64 (M·K can
pass 2³¹). Operands are cast to the activation dtype before ``tl.dot``, except that the LoRA
products run in fp32 when the adapters are fp32 (PEFT's autocast_adapter_dtype) and everything
runs in fp32 under the Triton interpreter when the data is bf16 (its bf16 ``tl.dot`` is wrong).
Grids are sized from the GPU's multiprocessor count, so that small problems still fill the GPU
without a zero-filled buffer for split reductions where possible (a zero-fill is one more launch).
Each launcher keys its call on what its checks and tile choices read and works those out once per
key (``launch.cached``); a repeated call allocates its outputs and runs the kept ``launch.Plan``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch (PDL): griddepcontrol, Hopper on
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_PDL = True
except ImportError:  # pragma: no cover - an older triton: the flags that use them stay off
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

from .dropout import dropout_keep
from .launch import INTERPRETING as _INTERPRETING
from .launch import cdiv as _cdiv
from .launch import ENABLED, Plan, cached, descriptor_launcher, env
from .launch import _current_stream, _data_ptr, aligned16


# How a tl.dot runs (a constexpr of every kernel, one per product), picked on the host:
NATIVE, FP32, SPLIT, BF16 = 0, 1, 2, 3


def _dot_mode(a_dtype, b_dtype) -> int:
    """The mode of a product whose left operand ``a`` is an activation (exact in its dtype) and whose
    right operand may be fp32 (fp32 adapters, the fp32 xa / dyb):

    NATIVE  both in a's dtype (the half types, equal);   FP32  both in fp32 (``_precision()``);
    SPLIT   a bf16, b fp32 split into two bf16 parts (b = hi + lo, 16 mantissa bits, relative
            error ~1e-5) — two bf16 tensor-core products instead of tf32x3's three tf32 ones.
    Under the interpreter bf16 always runs as FP32 (its bf16 tl.dot is wrong)."""
    if _INTERPRETING and torch.bfloat16 in (a_dtype, b_dtype):
        return FP32
    if a_dtype == b_dtype and a_dtype != torch.float32:
        return NATIVE
    if a_dtype == torch.bfloat16 and b_dtype == torch.float32:
        return SPLIT
    return FP32


def _expand_mode(out_dtype) -> int:
    """The LoRA expand (s·xa)·Bᵀ whose result is added into a bf16 output: BF16 (its rounding is the
    output's own); any other output: FP32."""
    return BF16 if out_dtype == torch.bfloat16 and not _INTERPRETING else FP32


def _precision() -> str:
    """Precision of the fp32 dots (fp32 adapters or activations): what torch uses for an fp32 matmul.

    Plain tf32 when torch allows tf32 matmuls; otherwise tf32x3 (three tf32 tensor-core products,
    fp32-accurate: measured on an H100 1.6e-7 relative error against 4.0e-4 for tf32 and 3e-7 for
    the non-tensor-core "ieee"), so fp32 adapters get the gradients PEFT's fp32 matmuls give.
    """
    return "tf32" if torch._C._get_cublas_allow_tf32() else "tf32x3"  # = torch.backends.cuda.matmul.allow_tf32


def pdl_ok(device: torch.device) -> bool:
    """Whether kernels on ``device`` may use programmatic dependent launch: a CUDA GPU of compute
    capability 9 or more (griddepcontrol) and a triton that has it; never under the interpreter."""
    return _pdl_on(True) and device.type == "cuda" and _device_props(device)[1] >= 9


def _pdl_on(flag: bool) -> bool:
    """``flag``, where this triton has PDL and the kernels run on a GPU (not the interpreter)."""
    return flag and HAS_PDL and not _INTERPRETING


def _pdl_meta(pdl: bool) -> dict:
    """The launch options of a kernel that waits (``PDL_WAIT``) for the kernel before it, launched
    with programmatic dependent launch when ``pdl`` (not under the interpreter)."""
    return dict(PDL_WAIT=True, launch_pdl=True) if _pdl_on(pdl) else dict(PDL_WAIT=False)


def _block_r(R: int, cap: int = 256) -> int:
    return max(16, min(cap, 1 << max(0, R - 1).bit_length()))


def _fit_stages(stages: int, stage_bytes: int, budget: int) -> int:
    """The most pipeline stages, at most ``stages`` and at least 1, whose tiles fit in ``budget``
    bytes of shared memory (H100: 227 KiB a block, less what the kernel needs besides)."""
    return max(1, min(stages, budget // stage_bytes))


_DEVICE_PROPS: dict = {}


def _device_props(device: torch.device) -> tuple:
    """(multiprocessors, compute capability major) of CUDA ``device``, asked once per device (the
    launchers read them on their hot paths)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = _DEVICE_PROPS.get(index)
    if props is None:
        p = torch.cuda.get_device_properties(index)
        props = _DEVICE_PROPS[index] = (p.multi_processor_count, p.major)
    return props


def _num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device``; a small fixed number under the interpreter, so that the tests
    there take the same grid-splitting branches the GPU takes."""
    if _INTERPRETING or device.type != "cuda":
        return 16
    return _device_props(device)[0]


@triton.jit
def _dot(a, b, acc, MODE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a·b in fp32, the operands as ``MODE`` says (see _dot_mode)."""
    if MODE == 1:  # FP32
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    elif MODE == 2:  # SPLIT: a exact in bf16; b = hi + lo, each bf16
        a16 = a.to(tl.bfloat16)
        hi = b.to(tl.bfloat16)
        acc = tl.dot(a16, hi, acc)
        acc = tl.dot(a16, (b - hi.to(tl.float32)).to(tl.bfloat16), acc)
    elif MODE == 3:  # BF16
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:  # NATIVE
        acc = tl.dot(a, b.to(a.dtype), acc)
    return acc


# ------------------------------------------------------------------------------------------
# shrink: out[M, R] = drop(x)[M, K] · A[R, K]ᵀ
# ------------------------------------------------------------------------------------------
@triton.jit
def _shrink_step(acc, x, a, seed, rows, k0, threshold, HAS_DROPOUT: tl.constexpr, MODE: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step of the shrink: acc[BLOCK_M, R] + drop(x)[BLOCK_M, BLOCK_K] · a[BLOCK_K, R], the
    mask of x's columns k0 .. k0 + BLOCK_K regenerated from the seed (every kernel with a shrink
    shares it)."""
    if HAS_DROPOUT:
        x = tl.where(dropout_keep(seed, rows, k0, BLOCK_M, BLOCK_K, threshold), x, 0.0)
    return _dot(x, a, acc, MODE, PRECISION)


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
        acc = _shrink_step(acc, x, a, seed, rm, k0, threshold, HAS_DROPOUT, MODE, PRECISION, BLOCK_M, BLOCK_K)
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
           None if seed is None else seed.dtype, threshold, drop_scale, _precision(), launch_dependents, partial,
           x.device, env("FASTPEFT_SHRINK_CONFIG"))
    return cached(key, _shrink_plan, x, a, seed is not None, threshold, drop_scale, launch_dependents, partial)(
        x, a, seed)


# Split-K partial sums of lora_shrink(partial=True): at most this many, so that the consumer's
# epilogue reads few (it waits for them on its critical path; the shrink itself runs beside the
# consumer's main loop under PDL)
MAX_PARTIALS = 8


def _shrink_grid(M: int, K: int, BLOCK_R: int, partial: bool = False, sms: int = 132):
    """(BLOCK_M, BLOCK_K, split_k) of lora_shrink. Small M splits K across programs (atomics into a
    zeroed output, or with ``partial`` at most MAX_PARTIALS partial sums) so the GPU reads x and A
    wide; large M takes K steps of 128 at R <= 32 (H200, dY·B at M = 8192, K = 2048: 21.3 against
    26.8 µs with steps of 64; K = 5632: 44.9 against 61.7) and, with ``partial`` from 512 rows (the
    TMA route's sizes; 257-511 rows were not timed split), splits K until there are two programs per
    multiprocessor (H200, M = 4096, K = 4096: 64 programs took 30 µs to read 32 MiB)."""
    BLOCK_M = min(16 if M <= 16 else (32 if M <= 32 else 64), max(16, 8192 // BLOCK_R))
    BLOCK_K = 128 if M <= 64 or (M > 256 and BLOCK_R <= 32) else 64
    n_m = max(1, _cdiv(M, BLOCK_M))
    if M > 256:
        split_k = max(1, min(_cdiv(2 * sms, n_m), _cdiv(K, 4 * BLOCK_K))) if partial and M >= 512 else 1
    else:
        split_k = 1 if _INTERPRETING and not partial else max(1, min(_cdiv(K, BLOCK_K), 128 // n_m))
    return BLOCK_M, BLOCK_K, min(split_k, MAX_PARTIALS) if partial else split_k


def _shrink_plan(x, a, has_dropout: bool, threshold: int, drop_scale: float, launch_dependents: bool = False,
                 partial: bool = False):
    """lora_shrink's work for one shape key: the checks, the tiles, the grid, once."""
    M, K = x.shape
    R, Ka = a.shape
    if Ka != K:
        raise ValueError(f"lora_shrink: x is (M={M}, K={K}) but A is (R={R}, K={Ka})")
    BLOCK_R = _block_r(R)
    BLOCK_M, BLOCK_K, split_k = _shrink_grid(M, K, BLOCK_R, partial, _num_sms(x.device))
    warps, stages = 4, 3
    pinned = env("FASTPEFT_SHRINK_CONFIG")  # for measuring: BLOCK_M,BLOCK_K,split_k,warps,stages
    if pinned:
        try:
            BLOCK_M, BLOCK_K, split_k, warps, stages = (int(v) for v in pinned.split(","))
        except ValueError:
            raise ValueError(f"FASTPEFT_SHRINK_CONFIG must be BLOCK_M,BLOCK_K,split_k,warps,stages, got {pinned!r}") \
                from None
        split_k = max(1, min(split_k, MAX_PARTIALS) if partial else split_k)
    n_m = max(1, _cdiv(M, BLOCK_M))
    alloc = torch.zeros if split_k > 1 and not partial else torch.empty
    shape = (split_k, M, R) if partial else (M, R)
    device = x.device
    plan = Plan(_lora_shrink_kernel, (n_m, split_k), (
        M, K, R, *x.stride(), *a.stride(), R, 1, M * R, threshold, drop_scale,
    ), HAS_DROPOUT=has_dropout, MODE=_dot_mode(x.dtype, a.dtype), PRECISION=_precision(), SPLIT_K=split_k,
        PARTIAL=partial, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
        LAUNCH_DEPENDENTS=_pdl_on(launch_dependents),
        num_warps=warps, num_stages=stages,
    )

    def run(x, a, seed):
        out = alloc(shape, dtype=torch.float32, device=device)
        if M:
            plan.run((x, a, out, out if seed is None else seed))
        return out

    return run


# ------------------------------------------------------------------------------------------
# shrink + expand over a block of rows: small = drop(a)·pᵀ, out = b + s·small·qᵀ [⊙ keep]
# ------------------------------------------------------------------------------------------
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
    # program (pid_s, pid_m): the shrink of rows pid_m over all of K (kept in registers), then the
    # expand onto every n_split-th BLOCK_N column block of out; programs pid_s > 0 recompute the
    # shrink (from L2: the grid is (n_split, n_m), so the programs sharing rows run side by side)
    # rather than wait for it, so small M still fills the GPU
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
        small = _shrink_step(small, a, p, seed, rm, k0, threshold, IN_DROPOUT, SHRINK_MODE, PRECISION,
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
        c = _dot(l, q, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), EXPAND_MODE, PRECISION)
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
    multiprocessor one (H100, M = 16384: 64 rows 130 µs, 32 rows 187, 16 rows 295); below that, the
    columns are split across programs that each redo their rows' shrink from L2. BLOCK_M·BLOCK_R
    fp32 stays in registers. Measured on an H200 at the training step's shapes (M = 8192): K steps
    of 128 instead of 64 took 30.4 against 36.8 µs (K = N = 2048) and 55.4 against 72.0 (K = 5632,
    N = 2048); with dropout on the input they took longer (51.1 against 48.0: the mask's registers),
    and there the split is dropped when the rows alone fill half the GPU, since every split program
    would redo the mask's Philox work in its shrink (42.8 against 48.0 µs; 85.6 against 104.4)."""
    if _INTERPRETING:
        BLOCK_M, BLOCK_K, BLOCK_N = 16, 32, 32
    else:
        BLOCK_M = next((bm for bm in (64, 32) if 4 * _cdiv(M, bm) >= 3 * sms), 16)
        BLOCK_M = max(16, min(BLOCK_M, 4096 // BLOCK_R))
        BLOCK_K = (64 if in_dropout else 128) if BLOCK_R <= 32 else (64 if BLOCK_R <= 64 else 32)
        BLOCK_N = max(16, min(128, 4096 // BLOCK_R))
    n_m = _cdiv(M, BLOCK_M)
    n_split = 1 if in_dropout and 2 * n_m >= sms else max(1, min(_cdiv(N, BLOCK_N), _cdiv(sms, n_m)))
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
           mask_output, out_dtype, scaling, threshold, drop_scale, _precision(),
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
    BLOCK_R = _block_r(R, 1 << 30)
    in_dropout = has_seed and not mask_output
    BLOCK_M, BLOCK_K, BLOCK_N, n_split = _shrink_expand_grid(M, N, BLOCK_R, _num_sms(device), in_dropout)
    plan = Plan(_lora_shrink_expand_kernel, (n_split, _cdiv(M, BLOCK_M)), (
        M, K, N, R, n_split, *a.stride(), *p.stride(), *q.stride(), R, 1, *out_strides,
        float(scaling), threshold, float(drop_scale),
    ), IN_DROPOUT=in_dropout, OUT_DROPOUT=has_seed and mask_output,
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate is not None, SHRINK_MODE=_dot_mode(a.dtype, p.dtype),
        EXPAND_MODE=_expand_mode(out_dtype),
        PRECISION=_precision(),
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


# ------------------------------------------------------------------------------------------
# linear + LoRA epilogue: out[M, N] = a·wᵀ + bias + (s·l·rᵀ) [⊙ keep·scale]
# ------------------------------------------------------------------------------------------
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
        lora = _dot(l, r, lora, EXPAND_MODE, PRECISION)
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
        acc = _dot(a, w, acc, MODE, PRECISION)
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


# Tile configs by M bucket (bench/bench_lora.py --tune, scripts/diag.py small): data, not code.
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); FASTPEFT_LINEAR_CONFIG pins one.
# H100, K = N = 4096, r = 16 (2026-11-23): M=1 28.5 us, M=16 23.1 us (F.linear 23.2), M=256 33.5 us
# (F.linear 27.4), M=4096 0.276 ms (F.linear 0.188), M=16384 1.175 ms (F.linear 0.814). H200, graph
# replay (2026-12-01): M <= 16 takes K steps of 256 (M = 1 / 16: 19.5 / 19.2 µs against 20.0 / 20.1,
# F.linear 18.7 / 19.5); M = 64 and 256 keep theirs (23.2, 30.7 µs; F.linear 18.4, 24.3).
LINEAR_CONFIGS = {
    16: (16, 32, 256, 8, 4, 4),
    64: (64, 64, 128, 8, 4, 4),
    256: (64, 128, 128, 8, 4, 3),
    "large": (128, 128, 64, 8, 8, 4),
}
_INTERPRETER_CONFIG = (16, 32, 32, 4, 4, 1)


def _linear_config(M: int) -> tuple:
    pinned = env("FASTPEFT_LINEAR_CONFIG")
    if pinned:
        return tuple(int(v) for v in pinned.split(","))
    if _INTERPRETING:
        return _INTERPRETER_CONFIG
    for bound in (16, 64, 256):
        if M <= bound:
            return LINEAR_CONFIGS[bound]
    return LINEAR_CONFIGS["large"]


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
           _precision(), env("FASTPEFT_LINEAR_CONFIG"), pdl, a.device)
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
    BM, BN, BK, GM, warps, stages = _linear_config(M)
    BLOCK_R = _block_r(R, 64)
    # fp32 operands take twice the shared memory per stage: drop stages to fit (H100: 227 KiB)
    stages = _fit_stages(stages, (BM + BN) * BK * max(a.element_size(), w.element_size()), 200 * 1024)
    plan = Plan(_lora_linear_kernel, (_cdiv(M, BM) * _cdiv(N, BN),), (
        M, N, K, R, *a.stride(), *w.stride(), *l2.stride(), *r.stride(), N, 1,
        l.stride(0) if partial else 0, float(scaling), threshold, float(drop_scale),
    ), HAS_BIAS=bias is not None, OUT_DROPOUT=has_seed,
        MODE=_dot_mode(a.dtype, w.dtype), EXPAND_MODE=_expand_mode(out_dtype),
        PRECISION=_precision(),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=BLOCK_R, GROUP_M=GM, L_SPLIT=l_split,
        num_warps=warps, num_stages=stages, **_pdl_meta(pdl),
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
    # each program walks tiles pid, pid + NUM_PROGRAMS, ...; a and w come in by TMA (descriptors
    # built on the host), the LoRA expand, mask and bias are added to the tile in registers
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    seed = tl.load(seed_ptr) if OUT_DROPOUT else 0
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            k0 = ki * BLOCK_K
            a = a_desc.load([off_m, k0])
            if W_KMAJOR:  # w (N, K) row-major: its tile [BLOCK_N, BLOCK_K], transposed in smem
                w = w_desc.load([off_n, k0]).T
            else:  # w given as its (K, N) row-major transpose: tile [BLOCK_K, BLOCK_N]
                w = w_desc.load([k0, off_n])
            acc = _dot(a, w, acc, MODE, PRECISION)
        rm = off_m + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        if PDL_WAIT:  # launched with PDL behind the kernel that writes l: wait for it here, not earlier
            gdc_wait()
        ep = (out_desc, bias_ptr, l_ptr, r_ptr, out_ptr, seed, lsum_ptr, N, R, stride_lm, stride_lr, stride_rn,
              stride_rr, stride_om, stride_ls, scaling, threshold, drop_scale)
        if EPILOGUE_SPLIT:  # the epilogue on two column halves: half the mask's and the LoRA term's registers
            HALF: tl.constexpr = BLOCK_N // 2
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
            _tma_epilogue_store(acc0, rm, m_ok, off_m, off_n, pid_n == 0, ep, HAS_BIAS, OUT_DROPOUT, TMA_STORE,
                                ACCUMULATE, EXPAND_MODE, PRECISION, BLOCK_M, HALF, BLOCK_R, L_SPLIT)
            _tma_epilogue_store(acc1, rm, m_ok, off_m, off_n + HALF, False, ep, HAS_BIAS, OUT_DROPOUT, TMA_STORE,
                                ACCUMULATE, EXPAND_MODE, PRECISION, BLOCK_M, HALF, BLOCK_R, L_SPLIT)
        else:
            _tma_epilogue_store(acc, rm, m_ok, off_m, off_n, pid_n == 0, ep, HAS_BIAS, OUT_DROPOUT, TMA_STORE,
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


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, TMA store, flatten[, warp specialize[,
# epilogue on two column halves]]), measured on an H200
# (scripts/diag.py gemm, M = 16384, K = N = 4096, with the LoRA epilogue): 128 x 256 tiles 772 µs (F.linear
# 700-800 in the same run); their 128 x 256 fp32 tile cannot take the dropout mask or an fp32 expand
# in one piece (spills: dX with the mask 1288 µs; fp16 outputs ran out of shared memory), so the mask
# takes them with the epilogue on two 128 x 128 halves ("wide_masked") or takes 128 x 128 tiles
# ("narrow"). Session 9 (one run): dX with the mask 904.6 µs wide_masked, 893.8 narrow, 922.3 the
# cuBLAS route (M = 8192, K = N = 2048: 131.2 / 127.7 / 139.8); the training step at dropout 0.05 took
# 58.7 / 57.8 ms with wide_masked's dX against 63.8 / 59.1 with the cuBLAS route's (two rounds).
# Without the mask the halves cost time (dX 921.1 against 797.0 µs): only the mask takes them.
# FASTPEFT_TMA_CONFIG pins one (and the auto route takes it at any width: ``tma_wide``).
TMA_CONFIGS = {"wide": (128, 256, 64, 16, 8, 3, True, True),
               "wide_masked": (128, 256, 64, 16, 8, 3, True, True, False, True),
               "narrow": (128, 128, 64, 8, 8, 4, True, True)}
TMA_MASKED_CONFIG = "wide_masked"  # the config of a bf16 output with the dropout mask
_TMA_INTERPRETER_CONFIG = (16, 32, 32, 4, 4, 1, True, False)


def _tma_config_name(out_dtype, has_seed: bool) -> str:
    if out_dtype != torch.bfloat16:
        return "narrow"
    return TMA_MASKED_CONFIG if has_seed else "wide"


def tma_wide(out_dtype, has_seed: bool) -> bool:
    """Whether the TMA matmul runs its 128 x 256 tiles for this output on the GPU (the auto route
    takes the TMA matmul only then: its narrow tiles lost to cuBLAS onto a prefilled C). A config
    pinned by FASTPEFT_TMA_CONFIG (for measuring) is taken whatever its width."""
    return bool(env("FASTPEFT_TMA_CONFIG")) or TMA_CONFIGS[_tma_config_name(out_dtype, has_seed)][1] == 256


def _tma_config(out_dtype, has_seed: bool) -> tuple:
    pinned = env("FASTPEFT_TMA_CONFIG")
    if pinned:
        v = pinned.split(",")
        return tuple(int(x) for x in v[:6]) + tuple(x.strip().lower() in ("1", "true") for x in v[6:10])
    if _INTERPRETING:
        return _TMA_INTERPRETER_CONFIG
    return TMA_CONFIGS[_tma_config_name(out_dtype, has_seed)]


def _tma_aligned(t: torch.Tensor) -> bool:
    """A 16-byte aligned base, and every stride but the unit one positive and a multiple of 16 bytes
    (a TMA descriptor takes no zero stride: expanded tensors, such as the dY of a sum, go elsewhere)."""
    return t.data_ptr() % 16 == 0 and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride() if s != 1)


def tma_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether lora_linear_tma takes a (M, K) and w (N, K): half precision, one dtype, unit stride along
    a's rows and along w's K or N, 16-byte aligned bases and row strides, a GPU with TMA (Hopper on)."""
    if a.dtype not in (torch.float16, torch.bfloat16) or w.dtype != a.dtype:
        return False
    if not _INTERPRETING and not (a.is_cuda and _device_props(a.device)[1] >= 9):
        return False
    return a.stride(1) == 1 and 1 in w.stride() and _tma_aligned(a) and _tma_aligned(w)


def lora_linear_tma(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor,
                    r: torch.Tensor, scaling: float, seed: torch.Tensor | None = None, threshold: int = 0,
                    drop_scale: float = 1.0, out_dtype: torch.dtype | None = None, mask_output: bool = False,
                    accumulate: torch.Tensor | None = None, config: tuple | None = None,
                    pdl: bool = False) -> torch.Tensor:
    """lora_linear's product as a persistent TMA matmul: out = a·wᵀ + bias +
    s·(l·rᵀ) [⊙ keep·scale, with ``mask_output``], added into ``accumulate`` (M, N) when given.

    a (M, K), w (N, K) with unit stride along K or along N (the dX form passes W's transpose view),
    both as ``tma_ok`` says; l (M, R), r (N, R) any strides; bias (N,) or None. As with lora_linear,
    ``l`` may be the (S, M, R) partial sums of ``lora_shrink(partial=True)``; the call then returns
    (out, their sum (M, R)). With ``pdl`` the kernel
    is launched with programmatic dependent launch behind the kernel that writes l (``lora_shrink``
    with launch_dependents): its main loop runs while that one finishes, and it waits before the
    epilogue reads l — so nothing else it reads may come from that kernel.
    """
    key = (_lora_linear_tma_kernel, a.shape, a.stride(), a.dtype, w.shape, w.stride(), w.dtype,
           None if bias is None else (bias.shape, bias.dtype), l.shape, l.stride(), l.dtype, r.shape, r.stride(),
           r.dtype, None if seed is None else seed.dtype, threshold, drop_scale, out_dtype, mask_output,
           None if accumulate is None else (accumulate.shape, accumulate.stride(), accumulate.dtype), scaling,
           _precision(), config, env("FASTPEFT_TMA_CONFIG"), pdl, a.device)
    return cached(key, _tma_plan, a, w, bias, l, r, scaling, seed is not None, threshold, drop_scale, out_dtype,
                  mask_output, accumulate, config, pdl)(a, w, bias, l, r, seed, accumulate)


def _tma_plan(a, w, bias, l, r, scaling, has_seed, threshold, drop_scale, out_dtype, mask_output, accumulate,
              config, pdl=False):
    """lora_linear_tma's work for one shape key. After the first launch (through Triton, which compiles)
    a run launches the compiled kernel directly, with the descriptors of a, w and out encoded once per
    base pointer (``launch.descriptor_launcher``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

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
    BM, BN, BK, GM, warps, stages, tma_store, flatten, *extra = config or _tma_config(out_dtype, has_seed)
    split = len(extra) > 1 and bool(extra[1])
    device = a.device
    kmajor = w.stride(1) == 1
    tiles = _cdiv(M, BM) * _cdiv(N, BN)
    programs = max(1, min(tiles, _num_sms(device)))
    meta = dict(HAS_BIAS=bias is not None, OUT_DROPOUT=has_seed, W_KMAJOR=kmajor,
                TMA_STORE=tma_store or accumulate is not None, ACCUMULATE=accumulate is not None,
                MODE=_dot_mode(a.dtype, w.dtype), EXPAND_MODE=_expand_mode(out_dtype), PRECISION=_precision(),
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=_block_r(R, 64), GROUP_M=GM, NUM_PROGRAMS=programs,
                FLATTEN=flatten, WARP_SPECIALIZE=bool(extra and extra[0]) and not _INTERPRETING, num_warps=warps,
                num_stages=stages, L_SPLIT=l_split, EPILOGUE_SPLIT=split)
    meta.update(_pdl_meta(pdl))
    scalars = (M, N, K, R, *l2.stride(), *r.stride(), N, l.stride(0) if partial else 0, float(scaling), threshold,
               float(drop_scale))
    kernel = _lora_linear_tma_kernel[(programs,)]
    n_args = 9 + len(scalars)
    tail = tuple(meta[name] for name in _lora_linear_tma_kernel.arg_names[n_args:])
    grid3 = (programs, 1, 1)
    direct = []  # after the first launch: descriptor_launcher's (call, expand) for this plan's kernel
    encoded = ({}, {}, {})  # a, w, out: base pointer -> the descriptor's launch form (descriptor_launcher)
    w_shape = [N, K] if kmajor else [K, N]
    w_block = [BN, BK] if kmajor else [BK, BN]
    a_block, out_block = [BM, BK], [BM, BN // 2 if split else BN]

    def descriptor(i, t):  # a (M, K), w (its K-major or N-major form), out (M, N)
        if i == 0:
            return TensorDescriptor(t, [M, K], [t.stride(0), 1], a_block)
        if i == 1:
            return TensorDescriptor(t if kmajor else t.t(), w_shape, [t.stride(0 if kmajor else 1), 1], w_block)
        return TensorDescriptor(t, [M, N], [t.stride(0), 1], out_block)

    def encode(tensors, expand):
        forms = []
        for i, t in enumerate(tensors):
            cache, ptr = encoded[i], _data_ptr(t)
            form = cache.get(ptr)
            if form is None:
                if len(cache) >= 64:
                    cache.clear()
                form = cache[ptr] = expand(i, descriptor(i, t))
            forms += form
        return forms

    def run(a, w, bias, l, r, seed, accumulate):
        out = torch.empty((M, N), dtype=out_dtype, device=device) if accumulate is None else accumulate
        lsum = _lsum(l, partial, l_split, M, R)
        if M and N:
            pointers = (l if bias is None else bias, l, r, out, l if seed is None else seed, lsum)
            ptrs = tuple(map(_data_ptr, pointers))
            if direct and ENABLED and aligned16(ptrs):
                call, expand = direct[0]
                call(grid3, _current_stream(device.index), (*encode((a, w, out), expand), *ptrs, *scalars))
            else:  # through Triton (the first launch compiles; unaligned pointers re-specialize)
                args = (*(descriptor(i, t) for i, t in enumerate((a, w, out))), *pointers)
                compiled = kernel(*args, *scalars, **meta)
                if not direct and hasattr(compiled, "function") and ENABLED:
                    fast = descriptor_launcher(compiled, tail)
                    if fast is None:  # the compiled kernel's runner, which encodes the descriptors per call
                        runner = compiled[grid3]
                        fast = (lambda _grid, stream, args: runner(*args, *tail, stream=stream),
                                lambda _i, desc: (desc,))
                    direct.append(fast)
        elif l_split > 1:  # no output to compute, the sum still to hand back
            lsum = l.sum(0)
        return (out, lsum) if partial else out

    return run


# ------------------------------------------------------------------------------------------
# adapter gradients, both in one launch:
#   problem 0: dA[R, K] = s·drop_scale · Σ_m (dyb[m, R])ᵀ ⊗ drop(x)[m, K]   (stored transposed)
#   problem 1: dB[N, R] = s · Σ_m dY[m, N]ᵀ · xa[m, R]
# Each is out[C, R] = scale · Σ_m big[m, C]ᵀ · small[m, R]; programs 0 .. n_c0-1 take problem 0.
# ------------------------------------------------------------------------------------------
@triton.jit
def _weight_grad_tile(big_ptr, small_ptr, out_ptr, seed, pid_c, pid_s, M, C, R,
                      s_bm, s_bc, s_sm, s_sr, s_oc, s_or, scale, threshold,
                      DROPOUT: tl.constexpr, MODE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_M: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[pid_c's BLOCK_C columns, BLOCK_R] = scale · Σ_m big[m, C]ᵀ · small[m, R] over this program's
    rows of M, the dropout mask regenerated on big's (m, c) when DROPOUT."""
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm0 = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, BLOCK_M * SPLIT_M):
        rm = m0 + rm0
        m_ok = rm < M
        big = tl.load(big_ptr + rm[:, None].to(tl.int64) * s_bm + rc[None, :] * s_bc,
                      mask=m_ok[:, None] & (rc[None, :] < C), other=0.0)
        small = tl.load(small_ptr + rm[:, None].to(tl.int64) * s_sm + rr[None, :] * s_sr,
                        mask=m_ok[:, None] & (rr[None, :] < R), other=0.0)
        if DROPOUT:
            big = tl.where(dropout_keep(seed, rm, pid_c * BLOCK_C, BLOCK_M, BLOCK_C, threshold), big, 0.0)
        acc = _dot(tl.trans(big), small, acc, MODE, PRECISION)
    acc = acc * scale
    out = out_ptr + rc[:, None] * s_oc + rr[None, :] * s_or
    omask = (rc[:, None] < C) & (rr[None, :] < R)
    if SPLIT_M == 1:
        tl.store(out, acc, mask=omask)
    else:
        tl.atomic_add(out, acc, mask=omask, sem="relaxed")


@triton.jit
def _lora_weight_grad_kernel(
    big0_ptr, small0_ptr, out0_ptr, big1_ptr, small1_ptr, out1_ptr, seed_ptr,
    M, C0, C1, R, N_C0,
    s_b0m, s_b0c, s_s0m, s_s0r, s_o0c, s_o0r,
    s_b1m, s_b1c, s_s1m, s_s1r, s_o1c, s_o1r,
    scale0, scale1, threshold,
    HAS_DROPOUT: tl.constexpr, MODE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # programs 0 .. N_C0-1 take problem 0 (the only one dropout applies to), the others problem 1:
    # two loops, each pipelined on its own, so problem 1 never generates the mask
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    if pid_c < N_C0:
        _weight_grad_tile(big0_ptr, small0_ptr, out0_ptr, seed, pid_c, pid_s, M, C0, R,
                          s_b0m, s_b0c, s_s0m, s_s0r, s_o0c, s_o0r, scale0, threshold,
                          HAS_DROPOUT, MODE, PRECISION, SPLIT_M, BLOCK_M, BLOCK_C, BLOCK_R)
    else:
        _weight_grad_tile(big1_ptr, small1_ptr, out1_ptr, seed, pid_c - N_C0, pid_s, M, C1, R,
                          s_b1m, s_b1c, s_s1m, s_s1r, s_o1c, s_o1r, scale1, threshold,
                          False, MODE, PRECISION, SPLIT_M, BLOCK_M, BLOCK_C, BLOCK_R)


def _grad_grid(Cs: list, M: int, n_r: int, sms: int, dropout: bool = False, deterministic: bool = False):
    """(BLOCK_M, BLOCK_C, column blocks per problem, SPLIT_M).

    128 x 64 tiles (H100, bf16, M = 16384, K = N = 4096: 109 µs against 124-306 µs for 64-row or
    narrower tiles; H200 at the training step's shapes: 32-column tiles took twice as long as 64).
    From 8 row tiles up, M is split into partial sums added into zeroed outputs: in two halves
    (two partial sums added in either order give the same bits, so dA and dB stay deterministic;
    H200, M = 8192, K = N = 2048: 53.7 -> 36.0 µs), in four with dropout (the mask's Philox work
    is on dA's programs alone: 115.3 -> 65.5 µs in two, 55.3 in four), unless
    ``deterministic`` (torch.use_deterministic_algorithms), which keeps every split at two.
    Narrower column blocks and more splits only when too few programs would run (tiny C)."""
    block_m = 16 if _INTERPRETING else 128
    for block_c in (64, 32, 16):
        n_cs = [_cdiv(C, block_c) for C in Cs]
        if sum(n_cs) * n_r * 4 >= sms:
            break
    programs = sum(n_cs) * n_r
    if programs * 4 >= sms:
        split = 1 if M < 8 * block_m else (4 if dropout and M >= 16 * block_m else 2)
    else:
        split = max(1, min(_cdiv(M, 4 * block_m), sms // max(1, programs)))
    return block_m, block_c, n_cs, min(split, 2) if deterministic else split


def _grads_key(t):
    return None if t is None else (t.shape, t.stride(), t.dtype)


def lora_adapter_grads(x: torch.Tensor | None, dyb: torch.Tensor | None, dy: torch.Tensor | None,
                       xa: torch.Tensor | None, scaling: float, seed: torch.Tensor | None = None,
                       threshold: int = 0, drop_scale: float = 1.0):
    """(dA, dB) in fp32 from one launch: dA = s·dybᵀ·drop(x) (R, K), dB = s·dYᵀ·xa (N, R).

    x (M, K), dyb (M, R), dy (M, N), xa (M, R), any strides; pass x/dyb None to skip dA, dy/xa None
    to skip dB. The dropout mask (``seed``) is the forward's, regenerated on x's coordinates.
    """
    lead = x if x is not None else dy
    key = (_lora_weight_grad_kernel, _grads_key(x), _grads_key(dyb), _grads_key(dy), _grads_key(xa), scaling,
           None if seed is None else seed.dtype, threshold, drop_scale, _precision(),
           torch.are_deterministic_algorithms_enabled(), None if lead is None else lead.device)
    return cached(key, _grads_plan, x, dyb, dy, xa, scaling, seed is not None, threshold, drop_scale)(
        x, dyb, dy, xa, seed)


def _grads_plan(x, dyb, dy, xa, scaling, has_seed, threshold, drop_scale):
    """lora_adapter_grads' work for one shape key: the checks, the tiles, the grid, once; returns
    run(x, dyb, dy, xa, seed) -> (dA, dB)."""
    problems = [p for p in ((x, dyb, True), (dy, xa, False)) if p[0] is not None]
    if not problems:
        return lambda *args: (None, None)
    M = problems[0][0].shape[0]
    R = problems[0][1].shape[1]
    for big, small, _ in problems:
        if big.shape[0] != M or small.shape[0] != M or small.shape[1] != R:
            raise ValueError(f"lora_adapter_grads: {tuple(big.shape)} and {tuple(small.shape)} do not fit "
                             f"(M={M}, C) and (M={M}, R={R})")
    if len(problems) == 2 and x.dtype != dy.dtype:  # one launch needs one activation dtype
        def run_apart(x, dyb, dy, xa, seed):
            return (lora_adapter_grads(x, dyb, None, None, scaling, seed, threshold, drop_scale)[0],
                    lora_adapter_grads(None, None, dy, xa, scaling)[1])
        return run_apart
    device = problems[0][0].device
    BLOCK_R = _block_r(R, 64)
    n_r = _cdiv(R, BLOCK_R)
    has_dropout = has_seed and problems[0][2]
    BLOCK_M, BLOCK_C, n_cs, split_m = _grad_grid([big.shape[1] for big, _, _ in problems], M, n_r, _num_sms(device),
                                                 has_dropout, torch.are_deterministic_algorithms_enabled())
    n_c = sum(n_cs)
    # zeroed when programs add partial sums. Two tensors, not views of one zeroed buffer (one fill
    # launch less): the backward custom op under torch.compile may not return outputs that alias
    alloc = torch.zeros if split_m > 1 or M == 0 else torch.empty
    shapes = [((R, big.shape[1]) if is_a else (big.shape[1], R), is_a) for big, _, is_a in problems]
    args = []
    for (big, small, is_a), (shape, _) in zip(problems, shapes):
        s_oc, s_or = (1, shape[1]) if is_a else (shape[1], 1)  # dA is stored transposed
        args.append(((*big.stride(), *small.stride(), s_oc, s_or),
                     float(scaling * (drop_scale if is_a and has_seed else 1.0))))
    if len(args) == 1:
        args.append(args[0])
    (st0, sc0), (st1, sc1) = args
    C0 = problems[0][0].shape[1]
    C1 = problems[-1][0].shape[1]
    # pipeline stages of (big, small) tiles, at most 4
    stages = _fit_stages(4, BLOCK_M * (BLOCK_C * problems[0][0].element_size() + BLOCK_R * 4), 160 * 1024)
    plan = Plan(_lora_weight_grad_kernel, (n_c, split_m, n_r), (
        M, C0, C1, R, n_cs[0], *st0, *st1, sc0, sc1, threshold,
    ), HAS_DROPOUT=has_dropout, MODE=_dot_mode(problems[0][0].dtype, problems[0][1].dtype),
        PRECISION=_precision(), SPLIT_M=split_m, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R,
        num_warps=4, num_stages=stages,
    )
    launch_now = M > 0 and n_c > 0

    def run(x, dyb, dy, xa, seed):
        outs = {is_a: alloc(shape, dtype=torch.float32, device=device) for shape, is_a in shapes}
        if launch_now:
            ts = [(big, small, outs[is_a]) for big, small, is_a in ((x, dyb, True), (dy, xa, False)) if big is not None]
            t0, t1 = ts[0], ts[-1]
            plan.run((*t0, *t1, seed if has_dropout else t0[2]))
        return outs.get(True), outs.get(False)

    return run
