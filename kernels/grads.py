"""The LoRA adapter-weight gradients, both in one launch:

    problem 0: dA[R, K] = s·drop_scale · Σ_m (dyb[m, R])ᵀ ⊗ drop(x)[m, K]   (stored transposed)
    problem 1: dB[N, R] = s · Σ_m dY[m, N]ᵀ · xa[m, R]

Each is out[C, R] = scale · Σ_m big[m, C]ᵀ · small[m, R]; programs 0 .. n_c0-1 take problem 0. The
dropout mask is the forward's, regenerated on x's coordinates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block_r, dot, dot_mode, fit_stages, fp32_precision, num_sms
from .dropout import dropout_keep
from .launch import INTERPRETING, Plan, cached, cdiv


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
        acc = dot(tl.trans(big), small, acc, MODE, PRECISION)
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
    """out0[C0, R] = scale0·big0ᵀ·small0 (the mask on big0 when HAS_DROPOUT) and out1[C1, R] =
    scale1·big1ᵀ·small1, fp32, any strides; grid (column blocks of both, SPLIT_M, R blocks). With
    SPLIT_M > 1 each program adds its rows' partial sum into a zeroed output."""
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

    128 x 64 tiles (narrower or shorter ones were slower). From 8 row tiles up, M is split into
    partial sums added into zeroed outputs: in two halves (two partial sums added in either order
    give the same bits, so dA and dB stay deterministic), in four with dropout (the mask's Philox
    work is on dA's programs alone), unless ``deterministic`` (torch.use_deterministic_algorithms),
    which keeps every split at two. Narrower column blocks and more splits only when too few
    programs would run (tiny C)."""
    block_m = 16 if INTERPRETING else 128
    for block_c in (64, 32, 16):
        n_cs = [cdiv(C, block_c) for C in Cs]
        if sum(n_cs) * n_r * 4 >= sms:
            break
    programs = sum(n_cs) * n_r
    if programs * 4 >= sms:
        split = 1 if M < 8 * block_m else (4 if dropout and M >= 16 * block_m else 2)
    else:
        split = max(1, min(cdiv(M, 4 * block_m), sms // max(1, programs)))
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
           None if seed is None else seed.dtype, threshold, drop_scale, fp32_precision(),
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
    BLOCK_R = block_r(R, 64)
    n_r = cdiv(R, BLOCK_R)
    has_dropout = has_seed and problems[0][2]
    BLOCK_M, BLOCK_C, n_cs, split_m = _grad_grid([big.shape[1] for big, _, _ in problems], M, n_r, num_sms(device),
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
    stages = fit_stages(4, BLOCK_M * (BLOCK_C * problems[0][0].element_size() + BLOCK_R * 4), 160 * 1024)
    plan = Plan(_lora_weight_grad_kernel, (n_c, split_m, n_r), (
        M, C0, C1, R, n_cs[0], *st0, *st1, sc0, sc1, threshold,
    ), HAS_DROPOUT=has_dropout, MODE=dot_mode(problems[0][0].dtype, problems[0][1].dtype),
        PRECISION=fp32_precision(), SPLIT_M=split_m, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R,
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
