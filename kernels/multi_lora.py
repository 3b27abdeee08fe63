"""Batched multi-adapter LoRA for serving: many adapters in one batch, one adapter (a slot) per token.

    y[i] += scales[s] · (x[i] · A[s, :r]ᵀ) · B[s, :, :r]ᵀ      s = indices[i], r = ranks[s]

Adapters are stacked into slots: A (S, R, K), B (S, N, R), an adapter of rank r <= R in the first r
rows of A[s] and the first r columns of B[s] (what lies beyond is never read). Tokens with index -1
take no adapter. Two kernels, Punica's SGMV / vLLM's lora_shrink and lora_expand in shape:

    multi_lora_shrink   t (T, R) fp32 = x · A[slot]ᵀ per token, zeros past the slot's rank
    multi_lora_expand   y += scale[slot] · t · B[slot]ᵀ in place, fp32 sums, one rounding into y

and the whole layer with its base product, three ways: ``multi_lora_linear``, the shrink, the expand
writing y = bias + scale[slot] · t · B[slot]ᵀ (y not read), then cuBLAS adds x · Wᵀ into y in its
epilogue (``addmm_``), where the product's own time hides the read; ``multi_lora_wide``, for a weight
stored with the slots' A below it ([W; A] as one (N + S·R, K) matrix): one cuBLAS product gives the
base output and every slot's t side by side, then the expand reads each token's own slot's columns
(no shrink kernel, at the price of reading every slot's A, used or not); ``multi_lora_linear_tma``
(Hopper, half precision), the shrink, then a persistent TMA matmul that adds each token's terms to
its fp32 tile before the one store: y is never read back, which is what a prefill batch needs, whose
tiles' rows hold one adapter or two.

The expand (``_multi_lora_expand_kernel``) gives each program a token block and a run of column
blocks, so that there are a few programs per multiprocessor, each loading its tokens' t once; on
Hopper it is launched with programmatic dependent launch behind the shrink (the grouping read while
the shrink ends, t after ``gdc_wait``).

Both are grouped by segment: ``segments`` sorts the tokens by slot on the device (no host sync), and
each program takes BLOCK_M tokens of one slot, gathers their rows through ``order`` and loads that
slot's weight tiles once for all of them (a prefill batch with long runs of one adapter reads each
tile once per BLOCK_M tokens, not once per token). The shrink's R loop stops at the slot's own rank,
in BLOCK_R chunks, as S-LoRA's kernels do: rank padding costs neither reads nor products.

Which program takes which block: the grid's first axis numbers the non-empty (slot, token block)
pairs, slot after slot. There are at most min(T, cdiv(T, BLOCK_M) + S) of them whatever the
distribution, so that is the axis' size (a function of T and S, as a CUDA graph needs); each program
finds its slot from the counts (a cumulative sum over S values) and programs past the last pair exit
at once. vLLM's grid instead gives every slot cdiv(T, BLOCK_M) blocks, most of which exit: S times as
many programs for a prefill batch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import (NATIVE, block_r, dot, dot_mode, expand_mode, fp32_precision, gdc_launch_dependents, gdc_wait,
                     num_sms, pdl_meta, pdl_ok, pdl_on)
from .configs import TMA_CONFIGS, for_device, multi_lora_config, tma_config_name
from .linear import tma_ok, tma_tile
from .shrink import MAX_PARTIALS
from . import tuning
from .launch import INTERPRETING, DescriptorPlan, Plan, cached, cdiv, launch

_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class Segments(NamedTuple):
    """The tokens of a batch grouped by adapter slot (``segments``), all on the batch's device.

    order   (T,) int32: token ids sorted by slot, stably; the tokens with no slot come first
    starts  (S,) int32: where slot s's tokens begin in ``order`` (starts[0] = tokens with no slot)
    counts  (S,) int32: how many tokens slot s has
    """
    order: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor


# One program sorts up to this many tokens (and this many slots + 2 histogram bins); past it, torch ops.
SEGMENTS_MAX_TOKENS, SEGMENTS_MAX_SLOTS = 8192, 2046


@triton.jit
def _segments_kernel(indices_ptr, order_ptr, starts_ptr, counts_ptr, T, S, BLOCK_T: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    """``segments`` in one program: the tokens' keys (slot + 1) · BLOCK_T + token (-1 and out-of-range
    slots as slot -1) sorted, so that ``order`` is stable within a slot and the tokens with no slot
    come first; counts from a histogram of slot + 1 over BLOCK_S bins (padding lanes in the last bin,
    never read), starts its exclusive sum."""
    t = tl.arange(0, BLOCK_T)
    ok = t < T
    idx = tl.load(indices_ptr + t, mask=ok, other=-1).to(tl.int32)
    slot = tl.where((idx >= 0) & (idx < S), idx, -1)
    key = tl.where(ok, (slot + 1) * BLOCK_T + t, (S + 1) * BLOCK_T + t)
    tl.store(order_ptr + t, tl.sort(key) % BLOCK_T, mask=ok)
    hist = tl.histogram(tl.where(ok, slot + 1, BLOCK_S - 1), BLOCK_S)
    before = tl.cumsum(hist, 0) - hist
    b = tl.arange(0, BLOCK_S)
    real = (b >= 1) & (b <= S)
    tl.store(starts_ptr + b - 1, before.to(tl.int32), mask=real)
    tl.store(counts_ptr + b - 1, hist.to(tl.int32), mask=real)


def segments(indices: torch.Tensor, num_slots: int) -> Segments:
    """The tokens grouped by slot: ``indices`` (T,) any integer dtype, -1 (no adapter) or a slot in
    0 .. num_slots - 1. No host sync, so values cannot be checked: one outside -1 .. num_slots - 1 is
    taken as -1 (no adapter). Up to SEGMENTS_MAX_TOKENS tokens (and SEGMENTS_MAX_SLOTS slots) on a GPU
    (or under the interpreter): one kernel launch (``_segments_kernel``); else torch ops (a stable sort,
    two searchsorted)."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"segments: indices must be an integer tensor, got "
                         f"{indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__}")
    if indices.dim() != 1:
        raise ValueError(f"segments: indices must be 1-D (T,), got shape {tuple(indices.shape)}")
    if int(num_slots) < 1:
        raise ValueError(f"segments: num_slots must be >= 1, got {num_slots}")
    T, S = indices.shape[0], int(num_slots)
    if (indices.is_cuda or INTERPRETING) and 0 < T <= SEGMENTS_MAX_TOKENS and S <= SEGMENTS_MAX_SLOTS:
        order = torch.empty(T, dtype=torch.int32, device=indices.device)
        starts = torch.empty(S, dtype=torch.int32, device=indices.device)
        counts = torch.empty(S, dtype=torch.int32, device=indices.device)
        src = indices if indices.stride(0) == 1 else indices.contiguous()
        block_t = max(16, triton.next_power_of_2(T))
        launch(_segments_kernel, (1,), (src, order, starts, counts), (T, S), BLOCK_T=block_t,
               BLOCK_S=max(16, triton.next_power_of_2(S + 2)), num_warps=8 if block_t > 2048 else 4)
        return Segments(order, starts, counts)
    key = indices.long()
    key = torch.where((key >= 0) & (key < num_slots), key, -1)
    sorted_key, order = torch.sort(key, stable=True)
    slots = torch.arange(num_slots, device=indices.device)
    starts = torch.searchsorted(sorted_key, slots, out_int32=True)
    ends = torch.searchsorted(sorted_key, slots, right=True, out_int32=True)
    return Segments(order.to(torch.int32), starts, ends - starts)


def repeat_segments(seg: Segments, repeats: int) -> Segments:
    """The grouping of ``indices.repeat_interleave(repeats)`` from ``seg = segments(indices, S)``, by a
    few elementwise torch ops (no sort, traceable): token j·repeats + k follows row j's place in
    ``order``, and the starts and counts scale by ``repeats``. A batch's rows grouped once serve its
    tokens at any length (prefill, decode steps, beams)."""
    if repeats == 1:
        return seg
    order, starts, counts = seg
    step = torch.arange(repeats, dtype=torch.int32, device=order.device)
    return Segments((order[:, None] * repeats + step).reshape(-1), starts * repeats, counts * repeats)


@triton.jit
def _slot_block(counts_ptr, starts_ptr, pid, S, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                WITH_NONE: tl.constexpr):
    """(slot, first, count): program ``pid`` takes tokens first .. first + BLOCK_M of slot ``slot``,
    which has ``count`` tokens. Blocks are numbered slot after slot; slot >= S (S + 1 WITH_NONE)
    means there is no block ``pid``. WITH_NONE adds a last slot S: the tokens with no adapter (the
    first starts[0] of ``order``). BLOCK_S > S."""
    ss = tl.arange(0, BLOCK_S)
    counts = tl.load(counts_ptr + ss, mask=ss < S, other=0)
    if WITH_NONE:
        counts = tl.where(ss == S, tl.load(starts_ptr), counts)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, 0)
    slot = tl.sum((ends <= pid).to(tl.int32), 0)
    first = (pid - tl.sum(tl.where(ss == slot, ends - blocks, 0), 0)) * BLOCK_M
    count = tl.sum(tl.where(ss == slot, counts, 0), 0)
    return slot, first, count


@triton.jit
def _multi_lora_shrink_kernel(
    x_ptr, a_ptr, order_ptr, starts_ptr, counts_ptr, ranks_ptr, t_ptr,
    K, R, S,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_tt, stride_tr, stride_tp,
    MODE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr = False,
):
    """t[tok, :] (fp32) = x[tok, :] · A[s, :rank]ᵀ for the tokens tok of each slot s, zeros past the
    rank; any strides. Program (pid, pid_rk): token block pid (``_slot_block``), columns
    BLOCK_R·(pid_rk // SPLIT_K) onward, every SPLIT_K-th K block from pid_rk % SPLIT_K.

    SPLIT_K == 1: plain stores; programs past the rank and those of the extra slot (the tokens with no
    adapter) store zeros, so t needs no zeroing. SPLIT_K > 1 with PARTIAL: the same, split pid_k's
    partial sum at t + pid_k·stride_tp, for the consumer to add up. SPLIT_K > 1 otherwise: atomic adds
    of the partial sums into a zeroed t, up to the rank only. LAUNCH_DEPENDENTS: the next kernel
    (launched with PDL) may start now; it waits (``gdc_wait``) before it reads t."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    pid_r = tl.program_id(1) // SPLIT_K
    pid_k = tl.program_id(1) % SPLIT_K
    STORES: tl.constexpr = SPLIT_K == 1 or PARTIAL  # every element of t (of its split) stored, zeros too
    slot, first, count = _slot_block(counts_ptr, starts_ptr, pid, S, BLOCK_M, BLOCK_S, STORES)
    n_slots = S
    if STORES:  # with the extra slot of the tokens with no adapter
        n_slots = S + 1
    if slot >= n_slots:
        return
    has_slot = slot < S
    start = tl.where(has_slot, tl.load(starts_ptr + tl.minimum(slot, S - 1)), 0)
    rank = tl.where(has_slot, tl.minimum(tl.maximum(tl.load(ranks_ptr + tl.minimum(slot, S - 1)), 0), R), 0)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < count
    tok = tl.load(order_ptr + start + rows, mask=row_ok, other=0).to(tl.int64)
    r0 = pid_r * BLOCK_R
    rr = r0 + tl.arange(0, BLOCK_R)
    if PARTIAL:  # split pid_k's own partial sum
        t_ptr += pid_k.to(tl.int64) * stride_tp
    t_ptrs = t_ptr + tok[:, None] * stride_tt + rr[None, :] * stride_tr
    if r0 >= rank:  # columns past the slot's rank, or a token with no adapter: zeros, no product
        if STORES:
            tl.store(t_ptrs, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), mask=row_ok[:, None] & (rr[None, :] < R))
        return
    r_ok = rr < rank
    a_cols = a_ptr + slot.to(tl.int64) * stride_as + rr[None, :] * stride_ar
    x_rows = x_ptr + tok[:, None] * stride_xt
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        ks = k0 + rk
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :].to(tl.int64) * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_cols + ks[:, None].to(tl.int64) * stride_ak, mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = dot(x, a, acc, MODE, PRECISION)
    if STORES:  # acc is zero past the rank (A's columns there were masked): those zeros go too
        tl.store(t_ptrs, acc, mask=row_ok[:, None] & (rr[None, :] < R))
    else:
        tl.atomic_add(t_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :], sem="relaxed")


@triton.jit
def _load_t(ptrs, mask, stride_tp, T_SPLIT: tl.constexpr):
    """t at ``ptrs`` (fp32, zeros where masked): the sum of the shrink's T_SPLIT partial sums,
    stride_tp apart, added in a fixed order."""
    t = tl.load(ptrs, mask=mask, other=0.0)
    for _ in tl.static_range(1, T_SPLIT):
        ptrs += stride_tp
        t += tl.load(ptrs, mask=mask, other=0.0)
    return t


@triton.jit
def _multi_lora_expand_kernel(
    t_ptr, b_ptr, order_ptr, starts_ptr, counts_ptr, ranks_ptr, scales_ptr, y_ptr, bias_ptr, chunks_ptr,
    N, R, S, N_PER, t_offset,
    stride_tt, stride_tr, stride_tp, stride_ts, stride_bs, stride_bn, stride_br, stride_yt, stride_yn,
    MODE: tl.constexpr, PRECISION: tl.constexpr, T_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, R_ONCE: tl.constexpr, PDL_WAIT: tl.constexpr,
    CHUNKS: tl.constexpr = False,
):
    """y[tok, n] += scales[s] · t[tok, :rank] · B[s, n, :rank]ᵀ for the tokens tok of each slot s, in
    fp32 with one rounding into y; any strides. Program (pid, pid_n): token block pid
    (``_slot_block``), columns N_PER·pid_n .. N_PER·(pid_n + 1), BLOCK_N at a time, its tokens' t
    loaded once (R_ONCE: BLOCK_R >= R; else once per column block and R chunk). t may be T_SPLIT
    partial sums stride_tp apart, added in order; stride_ts: slot s's columns start s·stride_ts in
    (``slot_columns``); t starts t_offset elements past t_ptr. Tokens with no adapter, and slots of
    rank 0, are not touched.

    Not ACCUMULATE: y is written, not read: y[tok] = bias + the LoRA term for every token (bias alone,
    or zeros, for the tokens with no adapter, taken as one more slot), so that a product added into y
    afterwards (cuBLAS's addmm, which reads y in its epilogue) makes the layer. PDL_WAIT: launched with
    programmatic dependent launch behind the shrink; the grouping is read first, t after the wait.

    CHUNKS (sibling layers' outputs side by side, ``multi_lora_wide_group``): program pid_n takes row
    pid_n of the int32 table chunks (layer g, its columns n_first .. n_end, and the column offsets of
    its output in y, of its t and of its rows in B); layer g's ranks and scales are row g of ranks and
    scales (S apart)."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    if CHUNKS:
        chunk = chunks_ptr + pid_n * 6
        layer = tl.load(chunk)
        n_first = tl.load(chunk + 1)
        n_end = tl.load(chunk + 2)
        y_ptr += tl.load(chunk + 3).to(tl.int64) * stride_yn
        t_ptr += tl.load(chunk + 4).to(tl.int64) * stride_tr
        b_ptr += tl.load(chunk + 5).to(tl.int64) * stride_bn
        ranks_ptr += layer * S
        scales_ptr += layer * S
    else:
        n_first = pid_n * N_PER
        n_end = tl.minimum(N, n_first + N_PER)
    slot, first, count = _slot_block(counts_ptr, starts_ptr, pid, S, BLOCK_M, BLOCK_S, not ACCUMULATE)
    if ACCUMULATE:
        if slot >= S:
            return
    elif slot > S:
        return
    has_slot = slot < S
    s_ = tl.minimum(slot, S - 1)
    rank = tl.where(has_slot, tl.minimum(tl.load(ranks_ptr + s_), R), 0)
    if ACCUMULATE:
        if rank <= 0:
            return
    start = tl.where(has_slot, tl.load(starts_ptr + s_), 0)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < count
    tok = tl.load(order_ptr + start + rows, mask=row_ok, other=0).to(tl.int64)
    scale = tl.where(has_slot, tl.load(scales_ptr + s_).to(tl.float32), 0.0)
    t_rows = t_ptr + t_offset + tok[:, None] * stride_tt + s_.to(tl.int64) * stride_ts
    b_slot = b_ptr + s_.to(tl.int64) * stride_bs
    y_rows = y_ptr + tok[:, None] * stride_yt
    rr = tl.arange(0, BLOCK_R)
    if PDL_WAIT:  # t is the shrink's: wait for it here, after the grouping's loads
        gdc_wait()
    if R_ONCE:
        t = _load_t(t_rows + rr[None, :] * stride_tr, row_ok[:, None] & (rr < rank)[None, :], stride_tp, T_SPLIT)
    for n0 in range(n_first, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < n_end
        b_cols = b_slot + rn[None, :].to(tl.int64) * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if R_ONCE:
            b = tl.load(b_cols + rr[:, None] * stride_br, mask=(rr < rank)[:, None] & n_ok[None, :], other=0.0)
            acc = dot(t, b, acc, MODE, PRECISION)
        else:
            for r0 in range(0, rank, BLOCK_R):
                rk = r0 + rr
                r_ok = rk < rank
                tk = _load_t(t_rows + rk[None, :] * stride_tr, row_ok[:, None] & r_ok[None, :], stride_tp, T_SPLIT)
                b = tl.load(b_cols + rk[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                acc = dot(tk, b, acc, MODE, PRECISION)
        y_ptrs = y_rows + rn[None, :].to(tl.int64) * stride_yn
        mask = row_ok[:, None] & n_ok[None, :]
        out = scale * acc
        if ACCUMULATE:
            out += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        elif HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


def _device_error(what: str, tensors: dict, device: torch.device):
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device}, expected {device} (x's)")


def _check_segments(what: str, seg: Segments, T: int, S: int):
    order, starts, counts = seg
    if tuple(order.shape) != (T,) or order.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: seg.order must be ({T},) int32 or int64, got {tuple(order.shape)} {order.dtype}")
    if tuple(counts.shape) != tuple(starts.shape) or counts.dim() != 1:
        raise ValueError(f"{what}: seg.starts and seg.counts must be (S,), got {tuple(starts.shape)} and "
                         f"{tuple(counts.shape)}")
    if counts.shape[0] != S:
        raise ValueError(f"{what}: seg holds {counts.shape[0]} slots (segments(indices, {counts.shape[0]})) but the "
                         f"adapters hold S={S}")
    for name, t in (("starts", starts), ("counts", counts)):
        if t.dtype != torch.int32:
            raise ValueError(f"{what}: seg.{name} must be ({S},) int32 (one per slot), got {tuple(t.shape)} {t.dtype}")


def _check_ranks(what: str, ranks: torch.Tensor, S: int):
    if tuple(ranks.shape) != (S,) or ranks.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: ranks must be ({S},) int32 (one per slot), got {tuple(ranks.shape)} {ranks.dtype}")


def _seg_key(what: str, seg: Segments) -> tuple:
    """seg's part of a launcher's key (its shapes, dtypes, devices); a ValueError if it is no Segments."""
    if not isinstance(seg, tuple) or len(seg) != 3 or not all(isinstance(t, torch.Tensor) for t in seg):
        raise ValueError(f"{what}: seg must be the Segments that segments(indices, S) returns, got "
                         f"{type(seg).__name__}")
    o, s, c = seg
    return o.shape, o.dtype, o.device, s.shape, s.dtype, s.device, c.shape, c.dtype, c.device


def multi_lora_shrink(x: torch.Tensor, A: torch.Tensor, seg: Segments, ranks: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """t (T, R) fp32: t[i] = x[i] · A[s, :r]ᵀ with s the slot of token i and r = ranks[s]; zeros in
    columns >= r and in the rows of tokens with no slot.

    x (T, K) fp16/bf16/fp32, any strides; A (S, R, K) in fp32 or x's dtype, any strides; seg from
    ``segments(indices, S)``; ranks (S,) int32 on x's device (values clamped to 0 .. R). ``out``: a
    (T, R) fp32 tensor to write t into (any strides), returned."""
    key = (_multi_lora_shrink_kernel, x.shape, x.stride(), x.dtype, x.device, A.shape, A.stride(), A.dtype, A.device,
           _seg_key("multi_lora_shrink", seg), ranks.shape, ranks.dtype, ranks.device,
           None if out is None else (out.shape, out.stride(), out.dtype, out.device), fp32_precision())
    return cached(key, _shrink_plan, x, A, seg, ranks, out)(x, A, seg, ranks, out)


def _shrink_tiles(T: int, S: int, x_dtype, a_dtype, device, partial: bool) -> tuple:
    """(BLOCK_M, BLOCK_K, r_cap, split_k, warps, stages, mode) of the shrink: the config's, K halved
    where the products run in fp32, split_k at most MAX_PARTIALS with ``partial``."""
    (BLOCK_M, BLOCK_K, r_cap, split_k, warps, stages), _ = multi_lora_config(cdiv(max(T, 1), S), device)
    mode = dot_mode(x_dtype, a_dtype)
    if mode != NATIVE:  # fp32 products (two or three on the tensor cores): half the K step, or they spill
        BLOCK_K = max(16, BLOCK_K // 2)
    if partial:
        split_k = min(split_k, MAX_PARTIALS)
    return BLOCK_M, BLOCK_K, r_cap, split_k, warps, stages, mode


def _shrink_plan(x, A, seg, ranks, out, partial=False, launch_dependents=False):
    """multi_lora_shrink's work for one shape key: the checks, the tiles, the grid, once.
    ``partial`` (the layer launchers'): t comes back as (P, T, R), the P >= 1 split-K partial sums
    that the consumer adds up: no zero fill, no atomics."""
    what = "multi_lora_shrink"
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"{what}: x must be (T, K) fp16, bf16 or fp32, got {tuple(x.shape)} {x.dtype}")
    T, K = x.shape
    if A.dim() != 3 or A.shape[2] != K:
        raise ValueError(f"{what}: A must be (S, R, K={K}) (x is (T={T}, K={K})), got {tuple(A.shape)}")
    S, R, _ = A.shape
    if S < 1:
        raise ValueError(f"{what}: A must hold at least one slot, got {tuple(A.shape)}")
    if A.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"{what}: A must be fp32 or x's dtype {x.dtype}, got {A.dtype}")
    _check_segments(what, seg, T, S)
    _check_ranks(what, ranks, S)
    if out is not None and (tuple(out.shape) != (T, R) or out.dtype != torch.float32):
        raise ValueError(f"{what}: out must be ({T}, {R}) fp32, got {tuple(out.shape)} {out.dtype}")
    _device_error(what, {"A": A, "ranks": ranks, "seg.order": seg.order, "seg.starts": seg.starts,
                         "seg.counts": seg.counts, **({} if out is None else {"out": out})}, x.device)
    if partial and out is not None:
        raise AssertionError("the shrink's partial sums are allocated by the plan, not given")
    device = x.device
    BLOCK_M, BLOCK_K, r_cap, split_k, warps, stages, mode = _shrink_tiles(T, S, x.dtype, A.dtype, device, partial)
    BLOCK_R = block_r(R, r_cap)
    stores = split_k == 1 or partial  # every element stored (zeros too), the no-adapter tokens' included
    n_blocks = min(T, cdiv(T, BLOCK_M) + S + stores)  # non-empty (slot, token block) pairs, at most
    plan = Plan(_multi_lora_shrink_kernel, (n_blocks, cdiv(R, BLOCK_R) * split_k), (
        K, R, S, *x.stride(), *A.stride(), *(out.stride() if out is not None else (R, 1)), T * R,
    ), MODE=mode, PRECISION=fp32_precision(), SPLIT_K=split_k, PARTIAL=partial,
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, BLOCK_S=triton.next_power_of_2(S + 1),
        LAUNCH_DEPENDENTS=pdl_on(launch_dependents), num_warps=warps, num_stages=stages,
    )
    zeroed = not stores
    shape = (split_k, T, R) if partial else (T, R)

    def run(x, A, seg, ranks, out):
        if out is None:
            t = (torch.zeros if zeroed else torch.empty)(shape, dtype=torch.float32, device=device)
        else:
            t = out.zero_() if zeroed else out
        if T and R:
            plan.run((x, A, seg.order, seg.starts, seg.counts, ranks, t))
        return t

    return run


def multi_lora_expand(t: torch.Tensor, B: torch.Tensor, seg: Segments, ranks: torch.Tensor, scales: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
    """y += scales[s] · t[i, :r] · B[s, :, :r]ᵀ in place for each token i with a slot s (r = ranks[s]),
    summed in fp32 and rounded once into y; rows of tokens with no slot are not written. Returns y.

    t (T, R) fp32 (multi_lora_shrink's), or (P, T, R) split-K partial sums that the expand adds up;
    B (S, N, R) in fp32 or y's dtype, any strides; seg from
    ``segments(indices, S)``; ranks (S,) int32 and scales (S,) fp32 on y's device; y (T, N)
    fp16/bf16/fp32, any strides."""
    key = (_multi_lora_expand_kernel, t.shape, t.stride(), t.dtype, t.device, B.shape, B.stride(), B.dtype, B.device,
           _seg_key("multi_lora_expand", seg), ranks.shape, ranks.dtype, ranks.device,
           scales.shape, scales.dtype, scales.device, y.shape, y.stride(), y.dtype, y.device, fp32_precision())
    return cached(key, _expand_plan, t, B, seg, ranks, scales, y)(t, B, seg, ranks, scales, y)


def _check_expand(t, B, seg, ranks, scales, y, slot_columns=False) -> tuple:
    """multi_lora_expand's checks of its arguments (``slot_columns``: t is (T, S·R), slot s's columns
    from s·R, in any float dtype); returns (T, N, S, R)."""
    what = "multi_lora_expand"
    if y.dim() != 2 or y.dtype not in _FLOATS:
        raise ValueError(f"{what}: y must be (T, N) fp16, bf16 or fp32, got {tuple(y.shape)} {y.dtype}")
    T, N = y.shape
    if B.dim() != 3 or B.shape[1] != N:
        raise ValueError(f"{what}: B must be (S, N={N}, R) (y is (T={T}, N={N})), got {tuple(B.shape)}")
    S, _, R = B.shape
    if S < 1:
        raise ValueError(f"{what}: B must hold at least one slot, got {tuple(B.shape)}")
    if B.dtype not in (torch.float32, y.dtype):
        raise ValueError(f"{what}: B must be fp32 or y's dtype {y.dtype}, got {B.dtype}")
    if slot_columns:
        if t.dim() != 2 or tuple(t.shape) != (T, S * R) or t.dtype not in _FLOATS:
            raise ValueError(f"{what}: t must be (T={T}, S·R={S * R}), each slot's R columns side by side, got "
                             f"{tuple(t.shape)} {t.dtype}")
    elif t.dim() not in (2, 3) or tuple(t.shape[-2:]) != (T, R) or t.dtype != torch.float32 or t.shape[0] < 1:
        raise ValueError(f"{what}: t must be (T={T}, R={R}) fp32, or (P, T, R) partial sums (y is {tuple(y.shape)}, "
                         f"B {tuple(B.shape)}), got {tuple(t.shape)} {t.dtype}")
    _check_segments(what, seg, T, S)
    _check_ranks(what, ranks, S)
    if tuple(scales.shape) != (S,) or not scales.dtype.is_floating_point:
        raise ValueError(f"{what}: scales must be ({S},) fp32 (one per slot), got {tuple(scales.shape)} {scales.dtype}")
    _device_error(what, {"t": t, "B": B, "ranks": ranks, "scales": scales, "seg.order": seg.order,
                         "seg.starts": seg.starts, "seg.counts": seg.counts}, y.device)
    return T, N, S, R


def _expand_plan(t, B, seg, ranks, scales, y, accumulate=True, bias=None, slot_columns=False, pdl=False,
                 t_offset=0):
    """multi_lora_expand's work for one shape key: the checks, the tiles, the grid, once. Not
    ``accumulate`` (``multi_lora_linear``'s): y is written, not read, as bias (when given; zeros
    otherwise) + the LoRA terms, every row. ``slot_columns``: t is (T, S·R), every slot's product for
    every token (a wide base product's extra columns), and each token reads its own slot's R columns.
    ``t_offset``: the run is handed a tensor whose data t starts this many elements into (the wide
    route hands the whole wide output, no slice of it).
    ``pdl``: launched with programmatic dependent launch behind a shrink that lets it
    (``launch_dependents``). The columns are split so that there are about ``per_sm`` programs per
    multiprocessor (``_multi_lora_expand_kernel``)."""
    T, N, S, R = _check_expand(t, B, seg, ranks, scales, y, slot_columns)
    t_strides = _t_strides(t) if not slot_columns else (*t.stride(), 0, R * t.stride(1))
    grid, n_per, meta = _expand_tiles(T, N, S, R, y.device, y.dtype, accumulate)
    plan = Plan(_multi_lora_expand_kernel, grid, (N, R, S, n_per, t_offset, *t_strides, *B.stride(), *y.stride()),
                T_SPLIT=1 if slot_columns else _t_split(t), HAS_BIAS=bias is not None, **meta, **pdl_meta(pdl))

    def run(t, B, seg, ranks, scales, y, bias=None):
        if T and N and (R or not accumulate):
            plan.run((t, B, seg.order, seg.starts, seg.counts, ranks, scales, y, y if bias is None else bias, y))
        return y

    return run


def _expand_tiles(T: int, N: int, S: int, R: int, device, dtype, accumulate: bool) -> tuple:
    """The expand's grid (token blocks, column runs), columns per run and launch metadata for T tokens,
    N output columns (all layers' with CHUNKS), S slots of rank up to R: the config's tiles, the columns
    split so that there are about ``per_sm`` programs per multiprocessor."""
    _, (BLOCK_M, BLOCK_N, r_cap, warps, stages, per_sm) = multi_lora_config(cdiv(max(T, 1), S), device)
    n_blocks = min(T, cdiv(T, BLOCK_M) + S + (not accumulate))  # not accumulate: the no-adapter tokens too
    r_once = block_r(R, R_ONCE_MAX) >= R
    splits = min(max(1, cdiv(per_sm * num_sms(device), max(1, n_blocks))), cdiv(N, BLOCK_N))
    n_per = cdiv(cdiv(N, splits), BLOCK_N) * BLOCK_N
    meta = dict(MODE=expand_mode(dtype), PRECISION=fp32_precision(), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_R=block_r(R, R_ONCE_MAX if r_once else r_cap), BLOCK_S=triton.next_power_of_2(S + 1),
                ACCUMULATE=accumulate, R_ONCE=r_once, num_warps=warps, num_stages=stages)
    return (n_blocks, cdiv(N, n_per)), n_per, meta


R_ONCE_MAX = 64  # the expand loads its tokens' t once where R is at most this


def _t_split(t: torch.Tensor) -> int:
    """How many partial sums t (T, R) or (P, T, R) holds."""
    return t.shape[0] if t.dim() == 3 else 1


def _t_strides(t: torch.Tensor) -> tuple:
    """(stride_tt, stride_tr, stride_tp, stride_ts) of t (T, R) or (P, T, R)."""
    return (*t.stride()[1:], t.stride(0), 0) if t.dim() == 3 else (*t.stride(), 0, 0)


def _layer_key(what: str, x, indices, A, B, scales, ranks, seg) -> tuple:
    """The part of a layer launcher's key (``multi_lora``, ``multi_lora_linear``, ``multi_lora_wide``
    with its w_wide as A) that they all take: the shapes, strides, dtypes and devices of x, the
    indices, the stacked adapters and seg."""
    return (x.shape, x.stride(), x.dtype, x.device, indices.shape, indices.dtype, indices.device,
            A.shape, A.stride(), A.dtype, A.device, B.shape, B.stride(), B.dtype, B.device,
            scales.shape, scales.dtype, scales.device, ranks.shape, ranks.dtype, ranks.device,
            None if seg is None else _seg_key(what, seg), fp32_precision())


def multi_lora(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               scales: torch.Tensor, ranks: torch.Tensor, seg: Segments | None = None) -> torch.Tensor:
    """A layer's LoRA part over a batch of many adapters: y (T, N), the base output, += for each token
    i with slot s = indices[i] >= 0: scales[s] · x[i] · A[s, :r]ᵀ · B[s, :, :r]ᵀ, r = ranks[s]. In place;
    returns y.

    x (T, K); indices (T,) any integer dtype (-1: no adapter); A (S, R, K) and B (S, N, R) the stacked
    adapters; scales (S,) fp32; ranks (S,) int32; seg: ``segments(indices, S)`` where the caller
    already has it (one per batch serves every layer). Two kernel launches (plus ``segments``' where
    seg is not given; where the shrink splits K it leaves partial sums that the expand adds up, so t
    needs no zero fill; on Hopper the expand starts behind the shrink by programmatic dependent
    launch), no host sync, grids fixed by T, S, N and R: capturable in a CUDA graph. The checks and
    both launches are worked out once per key of shapes, strides, dtypes and devices
    (``_layer_plan``), so a repeated call builds one key."""
    run = multi_lora_plan(x, y, indices, A, B, scales, ranks, seg)
    if seg is None:
        seg = segments(indices, A.shape[0])
    return run(x, y, A, B, scales, ranks, seg)


def multi_lora_plan(x, y, indices, A, B, scales, ranks, seg=None):
    """``multi_lora``'s checked launches for its arguments' key: run(x, y, A, B, scales, ranks, seg)
    for any arguments of the same shapes, strides, dtypes and devices (seg given), with no key built;
    for a caller that keeps it across calls (``MultiLoraLinear``'s decode steps)."""
    key = (multi_lora, y.shape, y.stride(), y.dtype, y.device,
           *_layer_key("multi_lora", x, indices, A, B, scales, ranks, seg))
    return cached(key, _layer_plan, x, y, indices, A, B, scales, ranks, seg)


def _layer_plan(x, y, indices, A, B, scales, ranks, seg):
    """multi_lora's work for one key: the checks, then the shrink's and the expand's plans; returns
    run(x, y, A, B, scales, ranks, seg), which adds the LoRA terms into y and returns it."""
    _check_layer(x, y, indices, A, B, scales, ranks)
    if seg is None:  # the grouping's shapes and device, for the launchers' checks
        seg = segments(indices, A.shape[0])
    shrink, t, pdl = _layer_shrink(x, A, ranks, seg)
    expand = _expand_plan(t, B, seg, ranks, scales, y, pdl=pdl)

    def run(x, y, A, B, scales, ranks, seg):
        return expand(shrink(x, A, seg, ranks, None), B, seg, ranks, scales, y)

    return run


def _layer_shrink(x, A, ranks, seg) -> tuple:
    """The layer launchers' shrink: (its plan, giving split-K partial sums and letting the consumer
    start by PDL where ``_pdl`` says so; an empty tensor shaped as those partial sums, for the
    consumer's plan; whether the consumer is launched with PDL)."""
    pdl = _pdl(x.device)
    return _shrink_plan(x, A, seg, ranks, None, partial=True, launch_dependents=pdl), _partials_like(x, A, seg), pdl


def _check_linear_layer(what: str, x, w, bias, indices, A, B, scales, ranks) -> torch.Tensor:
    """The checks of a whole layer's launcher (``multi_lora_linear``, ``multi_lora_linear_tma``): x (T, K)
    and w (N, K) in one dtype, bias (N,) or None, and ``_check_layer``'s; returns an empty y (T, N)
    for the plans' checks."""
    if w.dim() != 2 or x.dim() != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"{what}: x must be (T, K) and w (N, K), got x {tuple(x.shape)} and w {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise ValueError(f"{what}: w must have x's dtype {x.dtype}, got {w.dtype}")
    N = w.shape[0]
    if bias is not None and (tuple(bias.shape) != (N,) or not bias.dtype.is_floating_point):
        raise ValueError(f"{what}: bias must be ({N},) floating point, got {tuple(bias.shape)} {bias.dtype}")
    y = torch.empty((x.shape[0], N), dtype=x.dtype, device=x.device)
    _check_layer(x, y, indices, A, B, scales, ranks)
    _device_error(what, {"w": w, **({} if bias is None else {"bias": bias})}, x.device)
    return y


def _pdl(device: torch.device) -> bool:
    """Whether the layer launchers' expand follows their shrink with programmatic dependent launch:
    on a GPU that has it, unless FASTPEFT_PDL=0."""
    return tuning.pinned(tuning.PDL) is not False and pdl_ok(device)


def _partials_like(x, A, seg) -> torch.Tensor:
    """An empty tensor shaped as the shrink's partial sums (P, T, R) for x and A, for the consumer's
    plan (its checks and strides)."""
    split = _shrink_tiles(x.shape[0], A.shape[0], x.dtype, A.dtype, x.device, True)[3]
    return torch.empty((split, x.shape[0], A.shape[1]), dtype=torch.float32, device=x.device)


def _check_layer(x, y, indices, A, B, scales, ranks):
    """multi_lora's checks across its arguments (each launcher checks its own as well)."""
    what = "multi_lora"
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x (T, K) and y (T, N) must have the same rows, got x {tuple(x.shape)} "
                         f"and y {tuple(y.shape)}")
    if indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{what}: indices must be an integer tensor, got {indices.dtype}")
    if tuple(indices.shape) != (x.shape[0],):
        raise ValueError(f"{what}: indices must be ({x.shape[0]},), one per row of x, got {tuple(indices.shape)}")
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"{what}: A must be (S, R, K) and B (S, N, R), got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"{what}: A holds {A.shape[0]} slots but B holds {B.shape[0]}")
    if A.shape[1] != B.shape[2]:
        raise ValueError(f"{what}: A's R is {A.shape[1]} (S, R, K) but B's is {B.shape[2]} (S, N, R)")
    if A.shape[2] != x.shape[1]:
        raise ValueError(f"{what}: A's K is {A.shape[2]} (S, R, K) but x's is {x.shape[1]} (T, K)")
    if B.shape[1] != y.shape[1]:
        raise ValueError(f"{what}: B's N is {B.shape[1]} (S, N, R) but y's is {y.shape[1]} (T, N)")
    for name, t in (("ranks", ranks), ("scales", scales)):
        if tuple(t.shape) != (A.shape[0],):
            raise ValueError(f"{what}: {name} must be ({A.shape[0]},), one per slot, got {tuple(t.shape)}")
    return True


def multi_lora_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor,
                      A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                      seg: Segments | None = None) -> torch.Tensor:
    """A whole layer over a batch of many adapters, the base matmul included: a new y (T, N) =
    x·wᵀ + bias, plus for each token i with slot s = indices[i] >= 0: scales[s] · x[i] · A[s, :r]ᵀ ·
    B[s, :, :r]ᵀ, r = ranks[s].

    x (T, K) fp16/bf16/fp32 and w (N, K) in x's dtype, any strides; bias (N,) or None; the rest as
    ``multi_lora``. Three launches (plus ``segments``' where seg is not given): the shrink (split-K
    partial sums), the expand writing y = bias + the LoRA terms (y written, not read), then cuBLAS's
    y += x·wᵀ (``addmm_``: beta = 1, y read in the product's epilogue, where a large product hides
    it). No host sync; capturable in a CUDA graph."""
    run = multi_lora_linear_plan(x, w, bias, indices, A, B, scales, ranks, seg)
    if seg is None:
        seg = segments(indices, A.shape[0])
    return run(x, w, bias, A, B, scales, ranks, seg)


def multi_lora_linear_plan(x, w, bias, indices, A, B, scales, ranks, seg=None):
    """``multi_lora_linear``'s checked launches for its arguments' key: run(x, w, bias, A, B, scales,
    ranks, seg) -> y for any arguments of the same shapes, strides, dtypes and devices (seg given)."""
    key = (multi_lora_linear, w.shape, w.stride(), w.dtype, w.device, _bias_key(bias),
           *_layer_key("multi_lora_linear", x, indices, A, B, scales, ranks, seg))
    return cached(key, _linear_layer_plan, x, w, bias, indices, A, B, scales, ranks, seg)


def _bias_key(bias) -> tuple | None:
    """A bias' part of a launcher's key: its shape, strides, dtype and device, or None."""
    return None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device)


def _linear_layer_plan(x, w, bias, indices, A, B, scales, ranks, seg):
    """multi_lora_linear's work for one key: the checks, the shrink's and the expand's plans; returns
    run(x, w, bias, A, B, scales, ranks, seg) -> y."""
    y = _check_linear_layer("multi_lora_linear", x, w, bias, indices, A, B, scales, ranks)
    T, N = y.shape
    device = x.device
    if seg is None:  # the grouping's shapes and device, for the checks
        seg = segments(indices, A.shape[0])
    shrink, t, pdl = _layer_shrink(x, A, ranks, seg)
    expand = _expand_plan(t, B, seg, ranks, scales, y, accumulate=False, bias=bias, pdl=pdl)

    def run(x, w, bias, A, B, scales, ranks, seg):
        y = torch.empty((T, N), dtype=x.dtype, device=device)
        if T and N:
            expand(shrink(x, A, seg, ranks, None), B, seg, ranks, scales, y, bias)
            y.addmm_(x, w.t())
        return y

    return run


def multi_lora_wide(x: torch.Tensor, w_wide: torch.Tensor, bias_wide: torch.Tensor | None, indices: torch.Tensor,
                    B: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                    seg: Segments | None = None) -> torch.Tensor:
    """A whole layer whose stacked A lies below its weight: y_wide (T, N + S·R) = x·w_wideᵀ (+ bias_wide)
    with w_wide = [W (N, K); A (S, R, K) as (S·R, K)], so that y_wide's last S·R columns are every
    slot's x·A[s]ᵀ for every token; then y_wide[i, :N] += scales[s] · y_wide[i, N + s·R : N + s·R + r] ·
    B[s, :, :r]ᵀ for each token i with slot s = indices[i] >= 0 (r = ranks[s]). Returns y_wide: the
    layer's output is its view y_wide[:, :N].

    x (T, K) fp16/bf16/fp32, w_wide and bias_wide (N + S·R,) or None in x's dtype;
    B (S, N, R), scales, ranks, seg as ``multi_lora``. Two launches: cuBLAS's product, whose extra
    columns are the shrink (it reads every slot's A, where the shrink reads the slots the batch uses),
    then the expand (``slot_columns``). t is rounded to x's dtype, as PEFT's lora_A output is."""
    run = multi_lora_wide_plan(x, w_wide, bias_wide, indices, B, scales, ranks, seg)
    if seg is None:
        seg = segments(indices, B.shape[0])
    return run(x, w_wide, bias_wide, B, scales, ranks, seg)


def multi_lora_wide_plan(x, w_wide, bias_wide, indices, B, scales, ranks, seg=None):
    """``multi_lora_wide``'s checked launches for its arguments' key: run(x, w_wide, bias_wide, B,
    scales, ranks, seg) -> y_wide for any arguments of the same shapes, strides, dtypes and devices."""
    key = (multi_lora_wide, _bias_key(bias_wide),
           *_layer_key("multi_lora_wide", x, indices, w_wide, B, scales, ranks, seg))
    return cached(key, _wide_layer_plan, x, w_wide, bias_wide, indices, B, scales, ranks, seg)


def _wide_layer_plan(x, w_wide, bias_wide, indices, B, scales, ranks, seg):
    """multi_lora_wide's work for one key: the checks and the expand's plan; returns run(x, w_wide,
    bias_wide, B, scales, ranks, seg) -> y_wide, whose x may also come with x's rows in leading
    dimensions (MultiLoraLinear's (batch, tokens, K)): F.linear's output then has y_wide's memory."""
    what = "multi_lora_wide"
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"{what}: x must be (T, K) fp16, bf16 or fp32, got {tuple(x.shape)} {x.dtype}")
    if B.dim() != 3:
        raise ValueError(f"{what}: B must be (S, N, R), got {tuple(B.shape)}")
    T, K = x.shape
    S, N, R = B.shape
    _check_wide_weight(what, x, w_wide, bias_wide, indices, "wide", "N + S·R", N + S * R, " (W above A)")
    if seg is None:  # the grouping's shapes and device, for the checks
        seg = segments(indices, S)
    y = torch.empty((T, N + S * R), dtype=x.dtype, device=x.device)
    expand = _expand_plan(y[:, N:], B, seg, ranks, scales, y[:, :N], slot_columns=True, t_offset=N)

    def run(x, w_wide, bias_wide, B, scales, ranks, seg):
        y = F.linear(x, w_wide, bias_wide)
        if T and N:  # y as t (its columns from N on) and as the output (its first N): no slices per call
            expand(y, B, seg, ranks, scales, y)
        return y

    return run


def _check_wide_weight(what: str, x, w, bias, indices, name: str, rows_are: str, rows: int, layout: str) -> None:
    """The wide launchers' checks (``multi_lora_wide``: name "wide", ``multi_lora_wide_group``: "group")
    of their weight w_<name> (rows, K) and bias_<name> (rows,) or None, in x's dtype and on its device
    (rows_are: what the rows are, layout: how they lie, for the message), and of the indices (T,)."""
    T, K = x.shape
    if w.dim() != 2 or tuple(w.shape) != (rows, K) or w.dtype != x.dtype:
        raise ValueError(f"{what}: w_{name} must be ({rows_are} = {rows}, K = {K}) in x's dtype {x.dtype}{layout}, "
                         f"got {tuple(w.shape)} {w.dtype}")
    if bias is not None and (tuple(bias.shape) != (rows,) or bias.dtype != x.dtype):
        raise ValueError(f"{what}: bias_{name} must be ({rows},) in x's dtype {x.dtype}, got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    if indices.dtype not in _INDEX_DTYPES or tuple(indices.shape) != (T,):
        raise ValueError(f"{what}: indices must be ({T},) integers, one per row of x, got {tuple(indices.shape)} "
                         f"{indices.dtype}")
    _device_error(what, {f"w_{name}": w, **({} if bias is None else {f"bias_{name}": bias})}, x.device)


def multi_lora_wide_group(x: torch.Tensor, w_group: torch.Tensor, bias_group: torch.Tensor | None,
                          indices: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                          widths: tuple, seg: Segments | None = None) -> torch.Tensor:
    """``multi_lora_wide`` for G layers of one input (q, k and v; gate and up) in one product and one
    expand: w_group holds each layer's wide weight [W_g (N_g, K); A_g (S·R, K)] one after the other, so
    that y_group (T, Σ (N_g + S·R)) = x·w_groupᵀ (+ bias_group) holds, for each layer g in turn, its
    base output then every slot's x·A_g[s]ᵀ; layer g's output is y_group's N_g columns from
    o_g = Σ_{h<g} (N_h + S·R), to which the expand adds scales[g, s]·t·B[:, b_g : b_g + N_g]ᵀ, with t
    layer g's columns of slot s = indices[i] and b_g = Σ_{h<g} N_h. Returns y_group.

    widths: (N_0, ..., N_{G-1}); B (S, Σ N_g, R) (the layers' B side by side), scales (G, S) and
    ranks (G, S) (row g: layer g's); x, indices and seg as ``multi_lora_wide``."""
    run = multi_lora_wide_group_plan(x, w_group, bias_group, indices, B, scales, ranks, widths, seg)
    if seg is None:
        seg = segments(indices, B.shape[0])
    return run(x, w_group, bias_group, B, scales, ranks, seg)


def multi_lora_wide_group_plan(x, w_group, bias_group, indices, B, scales, ranks, widths, seg=None):
    """``multi_lora_wide_group``'s checked launches for its arguments' key: run(x, w_group, bias_group,
    B, scales, ranks, seg) -> y_group for any arguments of the same shapes, strides, dtypes and devices."""
    key = (multi_lora_wide_group, tuple(widths), _bias_key(bias_group),
           *_layer_key("multi_lora_wide_group", x, indices, w_group, B, scales, ranks, seg))
    return cached(key, _wide_group_plan, x, w_group, bias_group, indices, B, scales, ranks, tuple(widths), seg)


def _wide_group_plan(x, w_group, bias_group, indices, B, scales, ranks, widths, seg):
    """multi_lora_wide_group's work for one key: the checks, the expand's plan and its chunk table (each
    layer's columns in runs, none across two layers); returns run(x, w_group, bias_group, B, scales,
    ranks, seg) -> y_group (x as ``_wide_layer_plan``'s)."""
    what = "multi_lora_wide_group"
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"{what}: x must be (T, K) fp16, bf16 or fp32, got {tuple(x.shape)} {x.dtype}")
    T, K = x.shape
    G = len(widths)
    if B.dim() != 3 or G < 1 or min(widths) < 1 or B.shape[1] != sum(widths):
        raise ValueError(f"{what}: B must be (S, ΣN_g = {sum(widths)}, R) for the layers' widths {tuple(widths)}, "
                         f"got {tuple(B.shape)}")
    S, N, R = B.shape
    width = N + G * S * R
    _check_wide_weight(what, x, w_group, bias_group, indices, "group", "Σ(N_g + S·R)", width, "")
    if B.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"{what}: B must be fp32 or x's dtype {x.dtype}, got {B.dtype}")
    if tuple(ranks.shape) != (G, S) or ranks.dtype not in _INDEX_DTYPES or not ranks.is_contiguous():
        raise ValueError(f"{what}: ranks must be ({G}, {S}) contiguous integers (a row per layer), got "
                         f"{tuple(ranks.shape)} {ranks.dtype}")
    if tuple(scales.shape) != (G, S) or not scales.dtype.is_floating_point or not scales.is_contiguous():
        raise ValueError(f"{what}: scales must be ({G}, {S}) contiguous floats (a row per layer), got "
                         f"{tuple(scales.shape)} {scales.dtype}")
    device = x.device
    _device_error(what, {"B": B, "ranks": ranks, "scales": scales}, device)
    if seg is None:
        seg = segments(indices, S)
    _check_segments(what, seg, T, S)
    y = torch.empty((T, width), dtype=x.dtype, device=device)
    grid, n_per, meta = _expand_tiles(T, N, S, R, device, x.dtype, True)
    table, y_off, b_off = [], 0, 0
    for g, n in enumerate(widths):  # (layer, first column, end, output's, t's and B's column offsets)
        table += [(g, n0, min(n, n0 + n_per), y_off, y_off + n, b_off) for n0 in range(0, n, n_per)]
        y_off, b_off = y_off + n + S * R, b_off + n
    chunks = torch.tensor(table, dtype=torch.int32, device=device)
    plan = Plan(_multi_lora_expand_kernel, (grid[0], len(table)), (
        N, R, S, n_per, 0, *y.stride(), 0, R * y.stride(1), *B.stride(), *y.stride(),
    ), T_SPLIT=1, HAS_BIAS=False, CHUNKS=True, **meta, **pdl_meta(False))

    def run(x, w_group, bias_group, B, scales, ranks, seg):
        y = F.linear(x, w_group, bias_group)
        if T and R:
            plan.run((y, B, seg.order, seg.starts, seg.counts, ranks, scales, y, y, chunks))
        return y

    return run


@triton.jit
def _multi_lora_tma_kernel(
    x_desc, w_desc, out_desc, bias_ptr, t_ptr, b_ptr, idx_ptr, ranks_ptr, scales_ptr,
    M, N, K, R, S,
    stride_i, stride_tt, stride_tr, stride_tp, stride_bs, stride_bn, stride_br,
    HAS_BIAS: tl.constexpr, MODE: tl.constexpr, EXPAND_MODE: tl.constexpr, PRECISION: tl.constexpr,
    T_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr,
    PDL_WAIT: tl.constexpr,
):
    """out[M, N] = x·wᵀ + bias + scales[s]·t[m, :r]·B[s, :, :r]ᵀ per row m with slot s = idx[m] (r =
    ranks[s]; rows with no slot, or one outside 0 .. S - 1, take the base alone): x (M, K) and w (N, K)
    by TMA descriptors, out stored by TMA. A persistent matmul (tiles pid, pid + NUM_PROGRAMS, ... in
    grouped order, as ``lora_linear_tma``'s) whose epilogue adds the LoRA terms to the fp32 tile: one
    product per distinct slot among the tile's rows (the other rows' t masked to zero), up to the
    number of runs of one slot in the tile's rows, so a prefill batch (long runs) pays one or two.
    t: the shrink's T_SPLIT partial sums (token order), added in a fixed order. PDL_WAIT: launched
    with programmatic dependent launch behind the shrink; t is read after the wait."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN):
        off_m, off_n, acc = tma_tile(x_desc, w_desc, tile, num_m, num_n, K, True, MODE, PRECISION,
                                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        rm = off_m + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        rn = off_n + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        slot = tl.load(idx_ptr + rm.to(tl.int64) * stride_i, mask=m_ok, other=-1).to(tl.int32)
        slot = tl.where((slot >= 0) & (slot < S), slot, S)  # S: no adapter
        before = tl.load(idx_ptr + (rm - 1).to(tl.int64) * stride_i, mask=m_ok & (rm > off_m), other=-2).to(tl.int32)
        before = tl.where((before >= 0) & (before < S), before, tl.where(before == -2, -1, S))
        runs = tl.sum((m_ok & (slot != before)).to(tl.int32), 0)  # runs of one slot: >= the distinct slots
        if PDL_WAIT:  # t is the shrink's: wait for it here, after the main loop
            gdc_wait()
        s_cur = tl.min(slot, 0)
        for _ in range(runs):
            if s_cur < S:
                rank = tl.minimum(tl.load(ranks_ptr + s_cur), R)
                scale = tl.load(scales_ptr + s_cur).to(tl.float32)
                sel = m_ok & (slot == s_cur)
                t_rows = t_ptr + rm[:, None].to(tl.int64) * stride_tt
                b_cols = b_ptr + s_cur.to(tl.int64) * stride_bs + rn[None, :].to(tl.int64) * stride_bn
                for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
                    rr = r0 + tl.arange(0, BLOCK_R)
                    r_ok = rr < rank
                    t = _load_t(t_rows + rr[None, :] * stride_tr, sel[:, None] & r_ok[None, :], stride_tp, T_SPLIT)
                    b = tl.load(b_cols + rr[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                    acc = dot(t * scale, b, acc, EXPAND_MODE, PRECISION)
                s_cur = tl.min(tl.where(slot > s_cur, slot, S), 0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


def multi_lora_tma_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``multi_lora_linear_tma`` takes x (T, K) and w (N, K): ``tma_ok``'s operands (one half
    dtype, a GPU with TMA), w stored (N, K) row-major. Its bf16 output takes the TMA matmul's wide
    tiles, fp16 the narrow ones (which lost to cuBLAS in the training layers: MultiLora routes bf16
    alone to it)."""
    return w.stride(1) == 1 and tma_ok(x, w)


def multi_lora_linear_tma(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor,
                          A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                          seg: Segments | None = None) -> torch.Tensor:
    """``multi_lora_linear``'s layer (a new y = x·wᵀ + bias + each token's LoRA terms) in two launches:
    the shrink (split-K partial sums), then a persistent TMA matmul whose epilogue adds each token's
    terms to the fp32 tile before its one store (``_multi_lora_tma_kernel``; launched with
    programmatic dependent launch behind the shrink on Hopper). y is written once, never read: no
    pass over it besides the product's own, which is what a prefill batch's layer needs. For batches
    whose tokens come in runs of one adapter (prefill: each row's tokens); any batch is right, but each
    output tile pays one product per distinct slot among its rows.

    x (T, K) and w (N, K) bf16 or fp16 as ``multi_lora_tma_ok`` says; bias (N,) or None; the rest as
    ``multi_lora`` (indices (T,) in token order, read by the epilogue; seg for the shrink). No host
    sync; capturable in a CUDA graph."""
    run = multi_lora_linear_tma_plan(x, w, bias, indices, A, B, scales, ranks, seg)
    if seg is None:
        seg = segments(indices, A.shape[0])
    return run(x, w, bias, indices, A, B, scales, ranks, seg)


def multi_lora_linear_tma_plan(x, w, bias, indices, A, B, scales, ranks, seg=None):
    """``multi_lora_linear_tma``'s checked launches for its arguments' key: run(x, w, bias, indices, A,
    B, scales, ranks, seg) -> y for any arguments of the same shapes, strides, dtypes and devices."""
    key = (multi_lora_linear_tma, w.shape, w.stride(), w.dtype, w.device, _bias_key(bias), indices.stride(),
           *_layer_key("multi_lora_linear_tma", x, indices, A, B, scales, ranks, seg))
    return cached(key, _tma_layer_plan, x, w, bias, indices, A, B, scales, ranks, seg)


def _tma_layer_plan(x, w, bias, indices, A, B, scales, ranks, seg):
    """multi_lora_linear_tma's work for one key: the checks, the shrink's plan, the matmul's tiles,
    grid and descriptors' shapes; returns run(x, w, bias, indices, A, B, scales, ranks, seg) -> y."""
    what = "multi_lora_linear_tma"
    _check_linear_layer(what, x, w, bias, indices, A, B, scales, ranks)
    if not multi_lora_tma_ok(x, w):
        raise ValueError(f"{what}: x {x.dtype} strides {x.stride()} and w {w.dtype} strides {w.stride()} are not its "
                         f"operands (one half dtype, w (N, K) row-major, unit inner strides, 16-byte aligned rows, a "
                         f"GPU with TMA)")
    (T, K), N = x.shape, w.shape[0]
    device = x.device
    if B.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"{what}: B must be fp32 or x's dtype {x.dtype}, got {B.dtype}")
    _device_error(what, {"indices": indices, "A": A, "B": B, "scales": scales, "ranks": ranks}, device)
    if seg is None:  # the grouping's shapes and device, for the shrink's checks
        seg = segments(indices, A.shape[0])
    shrink, t, pdl = _layer_shrink(x, A, ranks, seg)
    S, R = A.shape[:2]
    config = tuning.pinned(tuning.TMA) or for_device(TMA_CONFIGS, device)[tma_config_name(x.dtype, False)]
    BM, BN, BK, GM, warps, stages, _, flatten, *_ = config
    programs = max(1, min(cdiv(T, BM) * cdiv(N, BN), num_sms(device)))
    plan = DescriptorPlan(_multi_lora_tma_kernel, (programs,), (([T, K], [BM, BK], False), ([N, K], [BN, BK], False),
                                                                ([T, N], [BM, BN], False)), (
        T, N, K, R, S, indices.stride(0), *_t_strides(t)[:3], *B.stride(),
    ), device, HAS_BIAS=bias is not None, MODE=dot_mode(x.dtype, w.dtype), EXPAND_MODE=expand_mode(x.dtype),
        PRECISION=fp32_precision(), T_SPLIT=t.shape[0], BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        BLOCK_R=block_r(R, 64), GROUP_M=GM, NUM_PROGRAMS=programs, FLATTEN=flatten, num_warps=warps,
        num_stages=stages, **pdl_meta(pdl))

    def run(x, w, bias, indices, A, B, scales, ranks, seg):
        y = torch.empty((T, N), dtype=x.dtype, device=device)
        if T and N:
            t = shrink(x, A, seg, ranks, None)
            plan.run((x, w, y), (y if bias is None else bias, t, B, indices, ranks, scales))
        return y

    return run
