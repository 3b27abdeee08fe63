"""QLoRA's 4-bit base products, reading bitsandbytes' packed weights directly:

    nf4_matmul     out[M, N] = x[M, K] · W[N, K]ᵀ + bias [+ s·(l[M, R] · r[N, R]ᵀ)]          (forward)
    nf4_matmul_t   out[M, K] = dy[M, N] · W[N, K] [+ s·(l[M, R] · r[K, R]ᵀ) ⊙ keep/(1-p)]     (dX)
    nf4_dequantize W (N, K) in a float dtype, for the routes that hand a dense W to cuBLAS

with W = dequant(Wq); no dequantized copy of W is written by the two products. The format
(``Packed4bit``) is bitsandbytes' ``quantize_4bit`` (NF4 or FP4): W flattened row-major; two 4-bit
codes per uint8, the first element in the high nibble (byte j holds elements 2j and 2j+1); one fp32
absmax per ``blocksize`` consecutive elements of the flattened W; W.flat[i] = code[c_i]·absmax[i //
blocksize], ``code`` the 16-entry table. With double quantization (``nested``) the absmax is a uint8
code: absmax[b] = code2[q[b]]·absmax2[b // blocksize2] + offset, rebuilt where it is read
(``_block_scale``). K must be even (a byte never straddles two rows of W). Quantization blocks may
straddle rows (K not a multiple of blocksize) in the dequantize kernel and the tiled products (a scale
read per byte there), not in the decode path, whose K steps are whole blocks.

The table lookup (``LUT``, a constexpr, measured in docs/performance.md): 0 (the default) gathers the
16 values with tl.gather, 1 reads the 16-entry table per value, 2 reads one int64 per byte from a
256-entry table of value pairs (``pair_table``: both elements' fp32 values, exact).

* decode path (M <= GEMV_MAX_M): ``_nf4_gemv_kernel``; program (pid_n, pid_k) takes BLOCK_N rows of W
  over every SPLIT_K-th K step of GROUPS whole quantization blocks: one [BLOCK_N, GROUPS, blocksize/2]
  byte load per step, one scale per (row, block), x's matching [M, GROUPS, blocksize/2, 2] pairs. Up
  to 4 rows the products are kept per element in fp32 and summed once after the loop; from 5 rows the
  step's W tile is interleaved back and tl.dot'ed (16-row tiles). The LoRA term and bias are added by
  the pid_k == 0 programs; with SPLIT_K > 1 the partial sums go by fp32 atomics into a zeroed fp32
  output, cast after.
* dequantize: ``_nf4_dequant_kernel``; the packed bytes seen as [blocks, blocksize/2], whole blocks per
  program, each byte's two values interleaved in registers and stored contiguously (62-93% of the
  copy rate on an H100). QLoRA's route (fastpeft/qlora.py) uses it above the decode rows and for dX.
* tiled path: ``_nf4_tiled_kernel``; a grouped-order matmul whose K loop dequantizes W's (BLOCK_N x
  BLOCK_K) tile as its even and odd columns and tl.dot's each with x's matching columns, in x's dtype;
  the epilogue is linear.py's ``_lora_epilogue`` (bias, LoRA term).
* transposed (dX): ``_nf4_tiled_t_kernel``; the K loop runs over W's rows (N), the output columns are
  W's columns, dequantized as [BLOCK_K, BLOCK_N] tiles in order; the epilogue takes the dropout mask
  of the LoRA term, as lora_linear's dX does.
  The tiled path and the transposed product measured 10-18x F.linear (the dequantized tile goes
  through shared memory into every MMA): tested, not on QLoRA's route.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import tuning
from .common import block_r, dot, dot_mode, expand_mode, fp32_precision, num_sms
from .configs import nf4_dequant_config, nf4_gemv_config, nf4_tiled_config
from .launch import INTERPRETING, Plan, cached, cdiv
from .linear import _grouped_tile, _lora_epilogue

GEMV_MAX_M = 64  # rows up to which nf4_matmul takes the decode path (path="auto")
LUT_PAIRS, LUT_LOAD, LUT_GATHER = 2, 1, 0


class Packed4bit(NamedTuple):
    """One 4-bit weight W (N x K) as the kernels read it (bitsandbytes' QuantState, field for field).

    packed: N·K/2 uint8 bytes, contiguous; absmax: (N·K/blocksize rounded up,) fp32, or uint8 codes
    with ``nested`` = (code2 (256,) fp32, absmax2 fp32, blocksize2, offset: a 1-element fp32 tensor);
    code: the 16 fp32 table values; pairs: ``pair_table(code)``."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    pairs: torch.Tensor
    N: int
    K: int
    blocksize: int
    nested: Optional[tuple] = None


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: for byte b, the fp32 bits of code[b >> 4] (the first element) in the low 32 bits
    and of code[b & 15] in the high 32 bits: one read gives both values of a byte, exactly."""
    bits = code.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256, device=code.device)
    return bits[b >> 4] | (bits[b & 15] << 32)


def packed_4bit(packed, absmax, code, N: int, K: int, blocksize: int, nested=None) -> Packed4bit:
    """A ``Packed4bit`` from bitsandbytes' tensors (``nested``: (code2, absmax2, blocksize2, offset),
    the offset a float or a tensor); checks the shapes and dtypes, naming what is wrong."""
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    if K % 2 or N * K != 2 * packed.numel() or not packed.is_contiguous():
        raise ValueError(f"4-bit weight: packed must be N*K/2 = {N * K // 2} contiguous bytes with K even, got "
                         f"{packed.numel()} bytes for N={N}, K={K}")
    if blocksize < 32 or blocksize & (blocksize - 1) or blocksize > 4096:
        raise ValueError(f"4-bit weight: blocksize must be a power of two in 32..4096, got {blocksize}")
    blocks = cdiv(N * K, blocksize)
    want = torch.uint8 if nested is not None else torch.float32
    if absmax.dtype != want or absmax.numel() != blocks or not absmax.is_contiguous():
        raise ValueError(f"4-bit weight: absmax must be {blocks} contiguous {want} values "
                         f"({'nested' if nested is not None else 'not nested'}), got {absmax.numel()} {absmax.dtype}")
    if code.numel() != 16 or code.dtype != torch.float32:
        raise ValueError(f"4-bit weight: the code table must be 16 fp32 values, got {code.numel()} {code.dtype}")
    if nested is not None:
        code2, absmax2, blocksize2, offset = nested
        if (code2.numel() != 256 or code2.dtype != torch.float32 or absmax2.dtype != torch.float32
                or absmax2.numel() != cdiv(blocks, blocksize2)):
            raise ValueError(f"4-bit weight: nested must be (code2 256 fp32, absmax2 {cdiv(blocks, blocksize2)} fp32, "
                             f"blocksize2, offset), got code2 {code2.numel()} {code2.dtype}, absmax2 "
                             f"{absmax2.numel()} {absmax2.dtype}")
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor([float(offset)], dtype=torch.float32, device=absmax.device)
        nested = (code2, absmax2, int(blocksize2), offset.reshape(1).to(torch.float32))
    return Packed4bit(packed, absmax.reshape(-1), code, pair_table(code), N, K, blocksize, nested)


# --- dequantizing in registers -----------------------------------------------------------------
if INTERPRETING:
    @triton.jit
    def _mul_rn(a, b):
        return a * b
else:
    @triton.jit
    def _mul_rn(a, b):
        """a·b rounded to fp32 on its own: never contracted into an fma with a following add (PTX's
        explicit .rn), so that code2·absmax2 + offset rounds twice, as bitsandbytes' two steps do."""
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, mask, BLOCKSIZE2: tl.constexpr,
                 NESTED: tl.constexpr):
    """absmax of quantization blocks ``blk`` (any shape, int64) in fp32: read directly, or (NESTED)
    rebuilt from the double-quantized statistics, code2[q[blk]]·absmax2[blk // BLOCKSIZE2] + offset."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = _mul_rn(tl.load(code2_ptr + q), tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)) \
            + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def _lookup(byte, pair_ptr, code_ptr, LUT: tl.constexpr):
    """The two table values of each byte (int32, any shape), (first element, second element) in fp32:
    LUT 2 one int64 read of both (``pair_table``), 1 a read per value, 0 tl.gather of the 16 values
    (through shared memory: the fastest measured, docs/performance.md)."""
    if LUT == 2:
        pair = tl.load(pair_ptr + byte)
        first = pair.to(tl.int32).to(tl.float32, bitcast=True)
        second = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    elif LUT == 1:
        first = tl.load(code_ptr + (byte >> 4))
        second = tl.load(code_ptr + (byte & 0xF))
    else:
        table = tl.load(code_ptr + tl.arange(0, 16))
        flat = tl.reshape(byte, (byte.numel,))
        first = tl.reshape(tl.gather(table, flat >> 4, 0), byte.shape)
        second = tl.reshape(tl.gather(table, flat & 0xF, 0), byte.shape)
    return first, second


@triton.jit
def _dequant_pairs(w_ptr, pair_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, row_ok, c0, K,
                   BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                   ALIGNED: tl.constexpr, LUT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """W[rows, c0 : c0 + COLS] dequantized as (even columns, odd columns), each [ROWS, COLS // 2] fp32
    (zero outside the rows and K); c0 even, a multiple of COLS.

    Reads COLS/2 consecutive bytes of each row (row n starts at byte n·K/2). ALIGNED (K % BLOCKSIZE
    == 0, COLS <= BLOCKSIZE, both powers of two): the tile's columns of a row lie in one quantization
    block, whose scale is read once per row; otherwise each byte's block is computed and read."""
    HALF: tl.constexpr = COLS // 2
    rb = c0 // 2 + tl.arange(0, HALF)  # byte columns
    r64 = rows.to(tl.int64)
    ok = row_ok[:, None] & (rb[None, :] < K // 2)
    byte = tl.load(w_ptr + r64[:, None] * (K // 2) + rb[None, :], mask=ok, other=0).to(tl.int32)
    even, odd = _lookup(byte, pair_ptr, code_ptr, LUT)
    if ALIGNED:
        scale = _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                             r64 * (K // BLOCKSIZE) + c0 // BLOCKSIZE, row_ok, BLOCKSIZE2, NESTED)[:, None]
    else:  # a byte's two elements share a block (BLOCKSIZE even)
        blk = (r64[:, None] * K + 2 * rb[None, :]) // BLOCKSIZE
        scale = _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, ok, BLOCKSIZE2, NESTED)
    return even * scale, odd * scale


@triton.jit
def _dequant_tile(w_ptr, pair_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, row_ok, c0, K,
                  BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                  ALIGNED: tl.constexpr, LUT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """W[rows, c0 : c0 + COLS] dequantized, [ROWS, COLS] fp32 in column order (``_dequant_pairs``
    interleaved back)."""
    even, odd = _dequant_pairs(w_ptr, pair_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows,
                               row_ok, c0, K, BLOCKSIZE, BLOCKSIZE2, NESTED, ALIGNED, LUT, ROWS, COLS)
    return tl.reshape(tl.join(even, odd), (ROWS, COLS))


@triton.jit
def _small_lora(acc, rm, rn, m_ok, n_ok, l_ptr, r_ptr, bias_ptr, R, stride_lm, stride_lr, stride_rn, stride_rr,
                scaling, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + s·(l·rᵀ) + bias for a few rows (acc [BLOCK_M < 16, BLOCK_N]): broadcast multiply-adds
    in fp32 over R in chunks of BLOCK_R, where tl.dot would need 16 rows."""
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        l = tl.load(l_ptr + rm[:, None].to(tl.int64) * stride_lm + rr[None, :] * stride_lr,
                    mask=m_ok[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
        r = tl.load(r_ptr + rn[:, None].to(tl.int64) * stride_rn + rr[None, :] * stride_rr,
                    mask=n_ok[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
        acc += tl.sum((l * scaling)[:, None, :] * r[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc


# --- the kernels --------------------------------------------------------------------------------
@triton.jit
def _nf4_gemv_kernel(
    x_ptr, w_ptr, pair_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, l_ptr, r_ptr,
    out_ptr,
    M, N, K, R,
    stride_wn, stride_xm, stride_xk, stride_lm, stride_lr, stride_rn, stride_rr, stride_om, stride_on,
    scaling,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, LUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, MODE: tl.constexpr,
    EXPAND_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[M, N] = x[M, K]·W[N, K]ᵀ + bias + s·(l·rᵀ) for M <= BLOCK_M, K % BLOCKSIZE == 0, any x, l, r
    strides (R = 0: no LoRA term). Program (pid_n, pid_k) takes W rows pid_n·BLOCK_N .. and every
    SPLIT_K-th step of GROUPS whole quantization blocks: a [BLOCK_N, GROUPS, BLOCKSIZE/2] byte tile
    (one load, contiguous along each row, the whole step's bytes in flight at once), one scale per
    (row, block), and x's matching [BLOCK_M, GROUPS, BLOCKSIZE/2, 2] pairs. SPLIT_K > 1: fp32 atomics
    into a zeroed fp32 out; the LoRA term and bias from the pid_k == 0 programs."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HB: tl.constexpr = BLOCKSIZE // 2
    BK: tl.constexpr = GROUPS * BLOCKSIZE
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    rg = tl.arange(0, GROUPS)
    rj = tl.arange(0, HB)
    rp = tl.arange(0, 2)
    kblocks = K // BLOCKSIZE
    x_rows = x_ptr + rm.to(tl.int64)[:, None, None, None] * stride_xm
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # products kept per element, summed once after the loop
        acc4 = tl.zeros((BLOCK_M, BLOCK_N, GROUPS, HB), dtype=tl.float32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        g = k0 // BLOCKSIZE + rg  # blocks of the row
        g_ok = g < kblocks
        byte = tl.load(w_ptr + rn64[:, None, None] * stride_wn + (g[None, :, None] * HB + rj[None, None, :]),
                       mask=n_ok[:, None, None] & g_ok[None, :, None], other=0).to(tl.int32)
        first, second = _lookup(byte, pair_ptr, code_ptr, LUT)
        scale = _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rn64[:, None] * kblocks + g[None, :],
                             n_ok[:, None] & g_ok[None, :], BLOCKSIZE2, NESTED)[:, :, None]
        first = first * scale  # W[n, 2j], W[n, 2j + 1] of the step, [BLOCK_N, GROUPS, HB]
        second = second * scale
        ks = g[None, :, None, None] * BLOCKSIZE + 2 * rj[None, None, :, None] + rp[None, None, None, :]
        x = tl.load(x_rows + ks * stride_xk, mask=m_ok[:, None, None, None] & g_ok[None, :, None, None], other=0.0)
        if USE_DOT:
            w = tl.reshape(tl.join(first, second), (BLOCK_N, BK))  # W's columns in order
            acc = dot(tl.reshape(x, (BLOCK_M, BK)), tl.trans(w), acc, MODE, PRECISION)
        else:  # a few rows: x's even and odd columns against the two values of each byte, in fp32
            xe, xo = tl.split(x.to(tl.float32))
            acc4 += xe[:, None, :, :] * first[None, :, :, :] + xo[:, None, :, :] * second[None, :, :, :]
    if not USE_DOT:
        acc = tl.sum(tl.sum(acc4, axis=3), axis=2)
    if pid_k == 0:
        if USE_DOT:
            acc = _lora_epilogue(acc, rm, rn, m_ok, n_ok, pid_n * BLOCK_N, l_ptr, r_ptr, bias_ptr, l_ptr, 0, R,
                                 stride_lm, stride_lr, stride_rn, stride_rr, 0, False, scaling, 0, 1.0,
                                 HAS_BIAS, False, 1, EXPAND_MODE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
        else:
            acc = _small_lora(acc, rm, rn, m_ok, n_ok, l_ptr, r_ptr, bias_ptr, R, stride_lm, stride_lr, stride_rn,
                              stride_rr, scaling, HAS_BIAS, BLOCK_R)
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    omask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(out, acc, mask=omask, sem="relaxed")


@triton.jit
def _nf4_tiled_kernel(
    x_ptr, w_ptr, pair_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, l_ptr, r_ptr,
    out_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_lm, stride_lr, stride_rn, stride_rr, stride_om, stride_on,
    scaling,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr,
    LUT: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr, EXPAND_MODE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] = x[M, K]·W[N, K]ᵀ + bias + s·(l[M, R]·r[N, R]ᵀ) (R = 0: no LoRA term), any x, l, r
    strides; one program per BLOCK_M x BLOCK_N output tile in grouped order; each K step dequantizes
    W's tile as its even and odd columns, each tl.dot'ed in x's dtype with x's matching columns."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    HALF: tl.constexpr = BLOCK_K // 2
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rj = 2 * tl.arange(0, HALF)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rj
        x_ok = m_ok[:, None] & (ks[None, :] < K)
        xe = tl.load(x_rows + ks[None, :] * stride_xk, mask=x_ok, other=0.0)
        xo = tl.load(x_rows + (ks[None, :] + 1) * stride_xk, mask=x_ok, other=0.0)
        even, odd = _dequant_pairs(w_ptr, pair_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rn,
                                   n_ok, k0, K, BLOCKSIZE, BLOCKSIZE2, NESTED, ALIGNED, LUT, BLOCK_N, BLOCK_K)
        acc = dot(xe, tl.trans(even.to(x_ptr.dtype.element_ty)), acc, MODE, PRECISION)
        acc = dot(xo, tl.trans(odd.to(x_ptr.dtype.element_ty)), acc, MODE, PRECISION)
    acc = _lora_epilogue(acc, rm, rn, m_ok, n_ok, pid_n * BLOCK_N, l_ptr, r_ptr, bias_ptr, l_ptr, 0, R,
                         stride_lm, stride_lr, stride_rn, stride_rr, 0, False, scaling, 0, 1.0,
                         HAS_BIAS, False, 1, EXPAND_MODE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _nf4_tiled_t_kernel(
    x_ptr, w_ptr, pair_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, seed_ptr, l_ptr, r_ptr,
    out_ptr,
    M, N, K, R,
    stride_xm, stride_xn, stride_lm, stride_lr, stride_rk, stride_rr, stride_om, stride_ok,
    scaling, threshold, drop_scale,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr,
    LUT: tl.constexpr, OUT_DROPOUT: tl.constexpr, MODE: tl.constexpr, EXPAND_MODE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, K] = x[M, N]·W[N, K] + s·(l[M, R]·r[K, R]ᵀ) [⊙ keep·scale of the mask of out's
    elements], any x, l, r strides: the dX of the forward. Output tiles BLOCK_M x BLOCK_N over (M,
    K) in grouped order; the loop runs over N in steps of BLOCK_K, dequantizing W[n .., k ..] as a
    [BLOCK_K, BLOCK_N] tile in column order (``_dequant_tile``)."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    k_ok = rk < K
    rn = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    seed = tl.load(seed_ptr) if OUT_DROPOUT else 0
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + rn
        n_ok = ns < N
        x = tl.load(x_rows + ns[None, :] * stride_xn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = _dequant_tile(w_ptr, pair_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, ns, n_ok,
                          pid_k * BLOCK_N, K, BLOCKSIZE, BLOCKSIZE2, NESTED, ALIGNED, LUT, BLOCK_K, BLOCK_N)
        acc = dot(x, w.to(x_ptr.dtype.element_ty), acc, MODE, PRECISION)
    acc = _lora_epilogue(acc, rm, rk, m_ok, k_ok, pid_k * BLOCK_N, l_ptr, r_ptr, l_ptr, l_ptr, seed, R,
                         stride_lm, stride_lr, stride_rk, stride_rr, 0, False, scaling, threshold, drop_scale,
                         False, OUT_DROPOUT, 1, EXPAND_MODE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rk[None, :] * stride_ok
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _nf4_dequant_kernel(
    w_ptr, pair_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
    NBYTES, NBLOCKS,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, LUT: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """out.flat = W.flat in out's dtype (out contiguous): the packed bytes seen as [quantization
    blocks, BLOCKSIZE/2], BLOCKS whole blocks per program, one scale per block, each byte's two
    values interleaved back and stored contiguously. Blocks that straddle rows of W need nothing
    special here; the last block may be short."""
    HB: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    idx = blk[:, None] * HB + tl.arange(0, HB)[None, :]
    ok = idx < NBYTES
    byte = tl.load(w_ptr + idx, mask=ok, other=0).to(tl.int32)
    first, second = _lookup(byte, pair_ptr, code_ptr, LUT)
    scale = _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, blk < NBLOCKS, BLOCKSIZE2,
                         NESTED)[:, None]
    vals = tl.reshape(tl.join(first * scale, second * scale), (BLOCKS, BLOCKSIZE))
    out = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + out, vals.to(out_ptr.dtype.element_ty), mask=out < 2 * NBYTES)


# --- launchers ----------------------------------------------------------------------------------
def _weight_key(w: Packed4bit) -> tuple:
    return (w.N, w.K, w.blocksize, w.absmax.dtype, None if w.nested is None else (w.nested[1].numel(), w.nested[2]))


def _weight_tensors(w: Packed4bit) -> tuple:
    """The pointer arguments every kernel takes for W (unused ones point at absmax)."""
    code2, absmax2, _, offset = w.nested if w.nested is not None else (w.absmax, w.absmax, 1, w.absmax)
    return (w.packed, w.pairs, w.code, w.absmax, code2, absmax2, offset)


def _weight_meta(w: Packed4bit, cols: int | None = None) -> dict:
    """The constexprs that describe W to a kernel; with ``cols`` (the columns of W its tiles span, for
    the tiled kernels) also ALIGNED: whether a tile's row lies in one quantization block."""
    lut = tuning.pinned(tuning.NF4_LUT)
    meta = dict(BLOCKSIZE=w.blocksize, BLOCKSIZE2=1 if w.nested is None else w.nested[2],
                NESTED=w.nested is not None, LUT=LUT_GATHER if lut is None else lut)
    if cols is not None:
        meta["ALIGNED"] = w.K % w.blocksize == 0 and cols <= w.blocksize
    return meta


def _lora_parts(lora, M: int, rows: int):
    """(l, r, scaling, R, strides) of a ``lora`` = (l (M, R), r (rows, R), scaling) or None (R = 0)."""
    if lora is None:
        return None, None, 0.0, 0, (0, 0, 0, 0)
    l, r, scaling = lora
    if l.dim() != 2 or r.dim() != 2 or l.shape[0] != M or r.shape[0] != rows or l.shape[1] != r.shape[1]:
        raise ValueError(f"nf4 kernels: lora must be (l (M={M}, R), r ({rows}, R), scaling), got l "
                         f"{tuple(l.shape)}, r {tuple(r.shape)}")
    return l, r, float(scaling), l.shape[1], (*l.stride(), *r.stride())


def _lora_key(lora) -> tuple | None:
    if lora is None:
        return None
    l, r, scaling = lora
    return (l.shape, l.stride(), l.dtype, r.shape, r.stride(), r.dtype, float(scaling))


def nf4_matmul(x: torch.Tensor, w: Packed4bit, bias: torch.Tensor | None = None, lora: tuple | None = None,
               out_dtype: torch.dtype | None = None, path: str = "auto") -> torch.Tensor:
    """out = x·Wᵀ + bias [+ s·(l·rᵀ)]: x (M, K) any strides -> (M, N) in ``out_dtype`` (x's).

    bias (N,) or None; lora = (l (M, R), r (N, R), scaling) adds the LoRA term in the epilogue.
    ``path``: "auto" (decode path up to GEMV_MAX_M rows, else tiled), "gemv" or "tiled"."""
    key = (nf4_matmul, x.shape, x.stride(), x.dtype, _weight_key(w), None if bias is None else (bias.shape, bias.dtype),
           _lora_key(lora), out_dtype, path, fp32_precision(), x.device)
    return cached(key, _nf4_plan, x, w, bias, lora, out_dtype, path)(x, w, bias, lora)


def _check_x(x, rows: int, what: str) -> int:
    if x.dim() != 2 or x.shape[1] != rows:
        raise ValueError(f"{what}: x must be (M, {rows}), got {tuple(x.shape)}")
    return x.shape[0]


def _nf4_plan(x, w: Packed4bit, bias, lora, out_dtype, path):
    """nf4_matmul's work for one shape key: the checks, the path, the tiles, the grid, once."""
    N, K = w.N, w.K
    M = _check_x(x, K, "nf4_matmul")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"nf4_matmul: bias must be ({N},), got {tuple(bias.shape)}")
    if path not in ("auto", "gemv", "tiled"):
        raise ValueError(f"nf4_matmul: path must be auto, gemv or tiled, got {path!r}")
    _, _, scaling, R, lora_strides = _lora_parts(lora, M, N)
    gemv = path == "gemv" or (path == "auto" and M <= GEMV_MAX_M)
    if gemv and M > GEMV_MAX_M:
        raise ValueError(f"nf4_matmul: the gemv path takes up to {GEMV_MAX_M} rows, got M={M}")
    out_dtype = out_dtype or x.dtype
    device = x.device
    scalars = (M, N, K, R, *x.stride(), *lora_strides, N, 1, scaling)
    common = dict(HAS_BIAS=bias is not None, MODE=dot_mode(x.dtype, x.dtype), EXPAND_MODE=expand_mode(out_dtype),
                  PRECISION=fp32_precision(), BLOCK_R=block_r(max(R, 1), 64))
    if gemv:
        if K % w.blocksize:
            raise NotImplementedError(f"nf4_matmul: the decode path needs K ({K}) to be a multiple of the blocksize "
                                      f"({w.blocksize}); dequantize W (nf4_dequantize) for such weights")
        BN, groups, split_k, warps, stages = tuning.pinned(tuning.NF4_GEMV) or nf4_gemv_config(M, device)
        groups = max(1, min(groups, triton.next_power_of_2(K // w.blocksize)))
        BM = max(1, triton.next_power_of_2(M))
        use_dot = BM > 4
        BM = max(BM, 16) if use_dot else BM
        if use_dot and x.element_size() == 4:  # fp32 operands: half the K step, so the tiles fit in shared memory
            groups = max(1, groups // 2)
        split_k = _gemv_split(N, K, BN, groups * w.blocksize, split_k, num_sms(device))
        if not use_dot:
            common["BLOCK_R"] = 16
        plan = Plan(_nf4_gemv_kernel, (cdiv(N, BN), split_k), (M, N, K, R, K // 2, *scalars[4:]), SPLIT_K=split_k,
                    USE_DOT=use_dot, BLOCK_M=BM, BLOCK_N=BN, GROUPS=groups, num_warps=warps, num_stages=stages,
                    **_weight_meta(w), **common)
        atomic = split_k > 1
    else:
        BM, BN, BK, GM, warps, stages = tuning.pinned(tuning.NF4_TILED) or nf4_tiled_config(M, device)
        BK = min(BK, max(16, triton.next_power_of_2(K)))
        plan = Plan(_nf4_tiled_kernel, (cdiv(M, BM) * cdiv(N, BN),), scalars, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                    GROUP_M=GM, num_warps=warps, num_stages=stages, **_weight_meta(w, BK), **common)
        atomic = False

    def run(x, w, bias, lora):
        # split-K sums go by fp32 atomics into a zeroed fp32 output
        out = torch.zeros((M, N), dtype=torch.float32, device=device) if atomic else \
            torch.empty((M, N), dtype=out_dtype, device=device)
        if M and N:
            l, r = (lora[0], lora[1]) if lora is not None else (w.absmax, w.absmax)
            plan.run((x, *_weight_tensors(w), w.absmax if bias is None else bias, l, r, out))
        return out.to(out_dtype) if atomic else out

    return run


def _gemv_split(N: int, K: int, BN: int, BK: int, split_k: int, sms: int) -> int:
    """The decode path's split-K: ``split_k`` from the config (0: the rule), at most one K step each.
    The rule: none where the N blocks alone give every multiprocessor four programs (the loads of
    several programs in flight at once are what streams W near the copy rate), else enough splits
    for four."""
    blocks = cdiv(N, BN)
    if split_k <= 0:
        split_k = 1 if blocks >= 4 * sms else cdiv(4 * sms, blocks)
    return max(1, min(split_k, cdiv(K, BK)))


def nf4_matmul_t(dy: torch.Tensor, w: Packed4bit, lora: tuple | None = None, seed: torch.Tensor | None = None,
                 threshold: int = 0, drop_scale: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out = dy·W [+ s·(l·rᵀ) ⊙ keep·scale]: dy (M, N) any strides -> (M, K) in ``out_dtype`` (dy's).

    lora = (l (M, R), r (K, R), scaling): dX's LoRA term (l = dY·B, r = Aᵀ); with ``seed`` the
    dropout mask of the (M, K) output applies to that term (lora_linear's mask_output)."""
    key = (nf4_matmul_t, dy.shape, dy.stride(), dy.dtype, _weight_key(w), _lora_key(lora),
           None if seed is None else seed.dtype, threshold, drop_scale, out_dtype, fp32_precision(), dy.device)
    return cached(key, _nf4_t_plan, dy, w, lora, seed is not None, threshold, drop_scale, out_dtype)(dy, w, lora, seed)


def _nf4_t_plan(dy, w: Packed4bit, lora, has_seed, threshold, drop_scale, out_dtype):
    N, K = w.N, w.K
    M = _check_x(dy, N, "nf4_matmul_t")
    _, _, scaling, R, lora_strides = _lora_parts(lora, M, K)
    if has_seed and lora is None:
        raise ValueError("nf4_matmul_t: the dropout mask applies to the LoRA term: a seed needs lora")
    out_dtype = out_dtype or dy.dtype
    device = dy.device
    BM, BN, BK, GM, warps, stages = tuning.pinned(tuning.NF4_TILED) or nf4_tiled_config(M, device)
    BN = min(BN, max(16, triton.next_power_of_2(K)))
    plan = Plan(_nf4_tiled_t_kernel, (cdiv(M, BM) * cdiv(K, BN),),
                (M, N, K, R, *dy.stride(), *lora_strides, K, 1, scaling, threshold, float(drop_scale)),
                OUT_DROPOUT=has_seed, MODE=dot_mode(dy.dtype, dy.dtype), EXPAND_MODE=expand_mode(out_dtype),
                PRECISION=fp32_precision(), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=block_r(max(R, 1), 64),
                GROUP_M=GM, num_warps=warps, num_stages=stages, **_weight_meta(w, BN))

    def run(dy, w, lora, seed):
        out = torch.empty((M, K), dtype=out_dtype, device=device)
        if M and K:
            l, r = (lora[0], lora[1]) if lora is not None else (w.absmax, w.absmax)
            plan.run((dy, *_weight_tensors(w), w.absmax if seed is None else seed, l, r, out))
        return out

    return run


def nf4_dequantize(w: Packed4bit, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """W as an (N, K) tensor of ``dtype`` (into ``out``, (N, K) with unit column stride, when given)."""
    key = (nf4_dequantize, _weight_key(w), dtype, w.absmax.device)
    return cached(key, _dequant_plan, w, dtype)(w, out)


def _dequant_plan(w: Packed4bit, dtype):
    N, K = w.N, w.K
    device = w.absmax.device
    elements, warps = nf4_dequant_config(device)
    blocks = max(1, elements // w.blocksize)
    nblocks = cdiv(N * K, w.blocksize)
    plan = Plan(_nf4_dequant_kernel, (cdiv(nblocks, blocks),), (N * K // 2, nblocks), BLOCKS=blocks, num_warps=warps,
                **_weight_meta(w))

    def run(w, out):
        if out is None:
            out = torch.empty((N, K), dtype=dtype, device=device)
        elif out.shape != (N, K) or not out.is_contiguous() or out.dtype != dtype:
            raise ValueError(f"nf4_dequantize: out must be a contiguous ({N}, {K}) {dtype} tensor")
        if N and K:
            plan.run((*_weight_tensors(w), out))
        return out

    return run
