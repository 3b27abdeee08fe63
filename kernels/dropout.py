"""Dropout keep mask regenerated from a Philox seed, never stored.

The mask of element (m, k) of a 2-D activation comes from Philox-4x32 (``DROPOUT_ROUNDS`` rounds)
with key = the 64-bit seed and counter (k // 8, m, 0, 0): one call gives four 32-bit words = eight
16-bit lanes, one per column of the 8-column group. An element is kept when its lane is >= ``threshold``
= round(p · 65536), and kept values are scaled by 65536 / (65536 - threshold). Counters are (column
group, row) pairs, so no 64-bit element offset is ever formed and a tile of any shape regenerates
exactly its own bits.
``fastpeft.reference.dropout_mask`` is the same function in PyTorch (the oracle for tests).
"""
import triton
import triton.language as tl

# Philox rounds of the mask (fastpeft.reference imports it). Random123 (Salmon et al., SC'11) chose 10
# for Philox-4x32 as a margin above the fewest rounds that pass TestU01's BigCrush; no statistical
# defect is known at 7 (Ascend's PhiloxRandom defaults to it), and the mask's Philox work is most of
# what dropout costs in the kernels.
DROPOUT_ROUNDS = 7
_ROUNDS = tl.constexpr(DROPOUT_ROUNDS)


@triton.jit
def _keep_lo_hi(w, t):
    """The keep bits of the two 16-bit lanes of Philox word w: each lane compared as it comes, so no
    int32 tile of all the lanes is ever live (fewer registers and spills in the kernels that mask)."""
    return tl.join((w & 0xFFFF).to(tl.int32) >= t, (w >> 16).to(tl.int32) >= t)


@triton.jit
def dropout_keep(seed, rows, col0, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, threshold):
    """Boolean keep mask [BLOCK_M, BLOCK_K] for rows ``rows`` and columns col0 .. col0 + BLOCK_K.

    ``col0`` must be a multiple of 8 and BLOCK_K a multiple of 8. Eight columns cost one Philox call.
    """
    tl.static_assert(BLOCK_K % 8 == 0, "dropout tiles need BLOCK_K % 8 == 0")
    G: tl.constexpr = BLOCK_K // 8
    groups = (col0 // 8 + tl.arange(0, G)).to(tl.uint32)
    c0 = tl.broadcast_to(groups[None, :], (BLOCK_M, G))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BLOCK_M, G))
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero, _ROUNDS)
    keep = tl.join(tl.join(_keep_lo_hi(w0, threshold), _keep_lo_hi(w1, threshold)),
                   tl.join(_keep_lo_hi(w2, threshold), _keep_lo_hi(w3, threshold)))
    return tl.reshape(keep, (BLOCK_M, BLOCK_K))


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, M, K, stride_om, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(seed_ptr), rows, pid_k * BLOCK_K, BLOCK_M, BLOCK_K, threshold)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], keep.to(tl.int8), mask=mask)


def dropout_mask(seed, M: int, K: int, threshold: int):
    """Materialise the keep mask (M, K) as bool — for tests only; the LoRA kernels never store it."""
    import torch

    out = torch.empty((M, K), dtype=torch.int8, device=seed.device)
    grid = (triton.cdiv(M, 16), triton.cdiv(K, 64))
    _dropout_mask_kernel[grid](seed, out, M, K, out.stride(0), threshold, BLOCK_M=16, BLOCK_K=64)
    return out.bool()


@triton.jit
def _dropout_apply_kernel(seed_ptr, x_ptr, out_ptr, M, K, stride_xm, stride_om, threshold, scale,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_K, BLOCK_M, BLOCK_K, threshold)
    ok = (rows[:, None] < M) & (cols[None, :] < K)
    r64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + r64 * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r64 * stride_om + cols[None, :], tl.where(keep, x * scale, 0.0).to(out_ptr.dtype.element_ty),
             mask=ok)


def dropout_apply(x, seed, threshold: int, scale: float):
    """drop(x) = x · keep · scale as a new tensor of x's shape and dtype, with the mask every LoRA kernel
    regenerates from ``seed`` over the rows of x's 2-D view (x: any shape, unit stride in its last
    dimension). Applied to a gradient with the same seed it is dropout's backward."""
    import torch

    from .launch import cdiv, launch

    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if K > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, K), dtype=x.dtype, device=x.device)
    if M and K:
        launch(_dropout_apply_kernel, (cdiv(M, 32), cdiv(K, 128)), (seed, x2, out),
               (M, K, x2.stride(0), out.stride(0), threshold, float(scale)), BLOCK_M=32, BLOCK_K=128)
    return out.reshape(x.shape)
