"""The 4-bit base product of QLoRA, reading bitsandbytes' packed weights directly:

    out[M, N] = x[M, K] · dequant(Wq)[N, K]ᵀ + bias [+ s·(l[M, R] · r[N, R]ᵀ), tiled path]

so no dequantized copy of W is ever written. The format is bitsandbytes' ``quantize_4bit`` (NF4 or
FP4): W (N out x K in) flattened row-major; two 4-bit codes per uint8, the first element in the high
nibble (byte j holds elements 2j and 2j+1); one fp32 absmax per ``blocksize`` consecutive elements
of the flattened W; W[n, k] = code_table[code]·absmax[(n·K + k) // blocksize], the 16-entry table
(NF4 or FP4) passed as a tensor. With double quantization ("nested", ``compress_statistics=True``)
the absmax itself is a uint8 code: absmax[b] = code2[q[b]]·absmax2[b // blocksize2] + offset, rebuilt
inside the kernel where it is read (``_block_absmax``). K must be a multiple of ``blocksize``, so a
quantization block lies inside one row of W (and K is even, so a byte never straddles two rows).

* decode path (M <= GEMV_MAX_M): ``_nf4_gemv_kernel``; program (pid_n, pid_k) streams BLOCK_N rows of
  the packed W over every SPLIT_K-th K block of BLOCK_K columns (BLOCK_K/2 bytes a row, each byte read
  once, consecutive in memory), unpacks, looks the table up (in registers, tl.gather), scales by
  absmax and multiplies in fp32 with all M rows of x, which fit in registers; split-K sums go by
  fp32 atomics into a zeroed output, cast to the output dtype after.

Both paths dequantize in ``_dequant_tile``; BLOCK_K is at most the blocksize, so each row of a tile
takes one absmax (read, or rebuilt, once per row and K step).
* tiled path: ``_nf4_tiled_kernel``; a grouped-order matmul whose K loop dequantizes the
  (BLOCK_N x BLOCK_K) tile of W to the compute dtype and tl.dot's it with x's tile; its epilogue is
  linear.py's ``_lora_epilogue`` (bias, and the LoRA term when ``lora`` is given).

Nothing is saved for backward (the autograd side is not wired yet).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block_r, dot, dot_mode, expand_mode, fp32_precision, num_sms
from .configs import nf4_gemv_config, nf4_tiled_config
from .launch import Plan, cached, cdiv
from .linear import _grouped_tile, _lora_epilogue

GEMV_MAX_M = 64  # rows up to which nf4_matmul takes the decode path (path="auto")


@triton.jit
def _block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, blk, mask, offset, BLOCKSIZE2: tl.constexpr,
                  NESTED: tl.constexpr):
    """absmax of quantization blocks ``blk`` (any shape, int64) in fp32: read directly, or (NESTED)
    rebuilt from the double-quantized statistics, code2[q[blk]]·absmax2[blk // BLOCKSIZE2] + offset."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask,
                                                                          other=0.0) + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def _dequant_tile(w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, rn, n_ok, k0, K, offset,
                  BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rn, k0 : k0 + BLOCK_K] dequantized, [BLOCK_N, BLOCK_K] fp32 (zero outside N and K).

    Reads BLOCK_K/2 consecutive bytes of each of the rows (row n starts at byte n·K/2; k0 is even),
    splits each byte into its high nibble (element 2j) and low nibble (element 2j+1), interleaves
    them back in order, looks the 16-entry table up in registers (tl.gather: no per-element
    address) and scales each row by its one block absmax (BLOCK_K <= BLOCKSIZE, both powers of two,
    k0 a multiple of BLOCK_K: the tile's columns lie in one quantization block of each row)."""
    tl.static_assert(BLOCK_K <= BLOCKSIZE)
    HALF: tl.constexpr = BLOCK_K // 2
    rb = k0 // 2 + tl.arange(0, HALF)  # byte columns of the row
    rows = rn.to(tl.int64)
    packed = tl.load(w_ptr + rows[:, None] * (K // 2) + rb[None, :], mask=n_ok[:, None] & (rb[None, :] < K // 2),
                     other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed >> 4, packed & 0xF), (BLOCK_N * BLOCK_K,))  # element 2j, then 2j+1
    table = tl.load(code_ptr + tl.arange(0, 16))
    values = tl.reshape(tl.gather(table, codes, 0), (BLOCK_N, BLOCK_K))  # masked bytes: code 0, scale 0
    # K % BLOCKSIZE == 0: row n's block at column k0 is n·(K / BLOCKSIZE) + k0 // BLOCKSIZE
    scale = _block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, rows * (K // BLOCKSIZE) + k0 // BLOCKSIZE,
                          n_ok, offset, BLOCKSIZE2, NESTED)
    return values * scale[:, None]


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_om, stride_on,
    offset,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[M, N] = x[M, K]·dequant(W)[N, K]ᵀ + bias for M <= BLOCK_M, any x strides; program
    (pid_n, pid_k) takes W rows pid_n·BLOCK_N .. and every SPLIT_K-th BLOCK_K block of K. The product
    is a broadcast multiply-add in fp32 for a few rows (USE_DOT off), else tl.dot (MODE). With
    SPLIT_K > 1 the partial sums are added by fp32 atomics into a zeroed fp32 out, the bias by the
    pid_k == 0 programs."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        w = _dequant_tile(w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, rn, n_ok, k0, K, offset,
                          BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_N, BLOCK_K)
        ks = k0 + rk
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=m_ok[:, None] & (ks[None, :] < K), other=0.0)
        if USE_DOT:
            acc = dot(x, tl.trans(w), acc, MODE, PRECISION)
        else:  # a few rows: [BLOCK_M, 1, BLOCK_K] x [1, BLOCK_N, BLOCK_K], summed over K, in fp32
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    omask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(out, acc, mask=omask, sem="relaxed")


@triton.jit
def _nf4_tiled_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, bias_ptr, l_ptr, r_ptr, out_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_lm, stride_lr, stride_rn, stride_rr, stride_om, stride_on,
    offset, scaling,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    MODE: tl.constexpr, EXPAND_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] = x[M, K]·dequant(W)[N, K]ᵀ + bias + s·(l[M, R]·r[N, R]ᵀ) (R = 0: no LoRA term), any
    x, l, r strides; one program per BLOCK_M x BLOCK_N output tile in grouped order. Each K step
    dequantizes W's [BLOCK_N, BLOCK_K] tile (``_dequant_tile``) and tl.dot's it with x's tile in x's
    dtype (MODE); the epilogue is lora_linear's (``_lora_epilogue``, no dropout)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=m_ok[:, None] & (ks[None, :] < K), other=0.0)
        w = _dequant_tile(w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, rn, n_ok, k0, K, offset,
                          BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_N, BLOCK_K)
        acc = dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, MODE, PRECISION)
    acc = _lora_epilogue(acc, rm, rn, m_ok, n_ok, pid_n * BLOCK_N, l_ptr, r_ptr, bias_ptr, l_ptr, 0, R,
                         stride_lm, stride_lr, stride_rn, stride_rr, 0, False, scaling, 0, 1.0,
                         HAS_BIAS, False, 1, EXPAND_MODE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code_table: torch.Tensor, N: int,
               K: int, blocksize: int, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               nested: tuple | None = None, lora: tuple | None = None, path: str = "auto") -> torch.Tensor:
    """out = x·dequant(Wq)ᵀ + bias [+ s·(l·rᵀ)]: x (M, K) any strides -> (M, N) in ``out_dtype`` (x's).

    packed: the N·K/2 uint8 bytes of bitsandbytes' quantize_4bit (any shape, contiguous);
    absmax: (N·K/blocksize,) fp32, or its uint8 codes with ``nested`` = (code2 (256,) fp32, absmax2
    fp32, blocksize2, offset float): bitsandbytes' QuantState.state2 and offset; code_table: the 16
    values (QuantState.code); bias (N,) or None; lora = (l (M, R), r (N, R), scaling) adds the LoRA
    term in the tiled path's epilogue. ``path``: "auto" (decode path up to GEMV_MAX_M rows without
    lora, else tiled), "gemv" or "tiled"."""
    key = (nf4_matmul, x.shape, x.stride(), x.dtype, packed.numel(), absmax.shape, absmax.dtype, code_table.shape,
           N, K, blocksize, None if bias is None else (bias.shape, bias.dtype), out_dtype,
           None if nested is None else (nested[0].shape, nested[1].shape, nested[2], float(nested[3])),
           None if lora is None else (lora[0].shape, lora[0].stride(), lora[0].dtype, lora[1].shape,
                                      lora[1].stride(), lora[1].dtype, float(lora[2])),
           path, fp32_precision(), x.device)
    return cached(key, _nf4_plan, x, packed, absmax, code_table, N, K, blocksize, bias, out_dtype, nested, lora,
                  path)(x, packed, absmax, code_table, bias, nested, lora)


def _nf4_gemv_grid(M: int, N: int, K: int, BLOCK_N: int, BLOCK_K: int, sms: int) -> int:
    """split_k of the decode path: enough programs for two per multiprocessor where N alone leaves
    them idle, at most one K block each."""
    return max(1, min(cdiv(2 * sms, cdiv(N, BLOCK_N)), cdiv(K, BLOCK_K)))


def _nf4_plan(x, packed, absmax, code_table, N, K, blocksize, bias, out_dtype, nested, lora, path):
    """nf4_matmul's work for one shape key: the checks, the path, the tiles, the grid, once."""
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"nf4_matmul: x must be (M, K={K}), got {tuple(x.shape)}")
    M = x.shape[0]
    if blocksize < 32 or blocksize & (blocksize - 1):
        raise ValueError(f"nf4_matmul: blocksize must be a power of two >= 32, got {blocksize}")
    if K % blocksize:
        raise NotImplementedError(f"nf4_matmul: K={K} is not a multiple of blocksize={blocksize} (a quantization "
                                  f"block across two rows of W is not supported yet)")
    if packed.dtype != torch.uint8 or packed.numel() * 2 != N * K or not packed.is_contiguous():
        raise ValueError(f"nf4_matmul: packed must be N*K/2 = {N * K // 2} contiguous uint8 bytes, got "
                         f"{packed.numel()} {packed.dtype}")
    blocks = N * K // blocksize
    want = torch.uint8 if nested is not None else torch.float32
    if absmax.dtype != want or absmax.numel() != blocks or not absmax.is_contiguous():
        raise ValueError(f"nf4_matmul: absmax must be {blocks} contiguous {want} values "
                         f"({'nested' if nested is not None else 'not nested'}), got {absmax.numel()} {absmax.dtype}")
    if code_table.numel() != 16 or code_table.dtype != torch.float32:
        raise ValueError(f"nf4_matmul: code_table must be 16 fp32 values, got {code_table.numel()} {code_table.dtype}")
    blocksize2, offset = 1, 0.0
    if nested is not None:
        code2, absmax2, blocksize2, offset = nested
        if (code2.numel() != 256 or code2.dtype != torch.float32 or absmax2.dtype != torch.float32
                or absmax2.numel() != cdiv(blocks, blocksize2)):
            raise ValueError(f"nf4_matmul: nested must be (code2 256 fp32, absmax2 {cdiv(blocks, blocksize2)} fp32, "
                             f"blocksize2, offset), got code2 {code2.numel()} {code2.dtype}, absmax2 "
                             f"{absmax2.numel()} {absmax2.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"nf4_matmul: bias must be ({N},), got {tuple(bias.shape)}")
    if path not in ("auto", "gemv", "tiled"):
        raise ValueError(f"nf4_matmul: path must be auto, gemv or tiled, got {path!r}")
    if lora is not None:
        l, r, scaling = lora
        if l.dim() != 2 or r.dim() != 2 or l.shape[0] != M or r.shape[0] != N or l.shape[1] != r.shape[1]:
            raise ValueError(f"nf4_matmul: lora must be (l (M={M}, R), r (N={N}, R), scaling), got l "
                             f"{tuple(l.shape)}, r {tuple(r.shape)}")
        if path == "gemv":
            raise NotImplementedError("nf4_matmul: the LoRA epilogue is on the tiled path only")
    gemv = path == "gemv" or (path == "auto" and lora is None and M <= GEMV_MAX_M)
    if gemv and M > GEMV_MAX_M:
        raise ValueError(f"nf4_matmul: the gemv path takes up to {GEMV_MAX_M} rows, got M={M}")
    out_dtype = out_dtype or x.dtype
    device = x.device
    mode = dot_mode(x.dtype, x.dtype)
    common = dict(BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=nested is not None, HAS_BIAS=bias is not None,
                  MODE=mode, PRECISION=fp32_precision())
    if gemv:
        BN, BK, warps, stages = nf4_gemv_config(M, device)
        BK = min(BK, blocksize, max(16, triton.next_power_of_2(K)))  # a tile's columns in one block
        BM = max(1, triton.next_power_of_2(M))
        use_dot = BM >= 16
        BM = max(BM, 16) if use_dot else BM
        split_k = _nf4_gemv_grid(M, N, K, BN, BK, num_sms(device))
        plan = Plan(_nf4_gemv_kernel, (cdiv(N, BN), split_k), (M, N, K, *x.stride(), N, 1, float(offset)),
                    SPLIT_K=split_k, USE_DOT=use_dot, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                    num_warps=warps, num_stages=stages, **common)
        alloc_dtype = torch.float32 if split_k > 1 else out_dtype

        def run(x, packed, absmax, code_table, bias, nested, lora):
            out = (torch.zeros if split_k > 1 else torch.empty)((M, N), dtype=alloc_dtype, device=device)
            if M and N:
                c2, a2 = (nested[0], nested[1]) if nested is not None else (absmax, absmax)
                plan.run((x, packed, absmax, code_table, c2, a2, absmax if bias is None else bias, out))
            return out if alloc_dtype == out_dtype else out.to(out_dtype)

        return run

    BM, BN, BK, GM, warps, stages = nf4_tiled_config(M, device)
    BK = min(BK, blocksize, max(16, triton.next_power_of_2(K)))  # a tile's columns in one block
    if lora is not None:
        l, r, scaling = lora
        R, lora_strides = l.shape[1], (*l.stride(), *r.stride())
    else:
        R, lora_strides, scaling = 0, (0, 0, 0, 0), 0.0
    plan = Plan(_nf4_tiled_kernel, (cdiv(M, BM) * cdiv(N, BN),),
                (M, N, K, R, *x.stride(), *lora_strides, N, 1, float(offset), float(scaling)),
                EXPAND_MODE=expand_mode(out_dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=block_r(max(R, 1), 64),
                GROUP_M=GM, num_warps=warps, num_stages=stages, **common)

    def run(x, packed, absmax, code_table, bias, nested, lora):
        out = torch.empty((M, N), dtype=out_dtype, device=device)
        if M and N:
            c2, a2 = (nested[0], nested[1]) if nested is not None else (absmax, absmax)
            l, r = (lora[0], lora[1]) if lora is not None else (code_table, code_table)
            plan.run((x, packed, absmax, code_table, c2, a2, absmax if bias is None else bias, l, r, out))
        return out

    return run
