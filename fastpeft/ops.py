"""Autograd for the fused LoRA linear: which kernels run, what is saved for backward.

Forward  (x (..., K), W (N, K), A (R, K), B (N, R)), one of three routes by M (``main_matmul``):
    triton: xa = drop(x)·Aᵀ (``lora_shrink``), then y = x·Wᵀ + b + s·xa·Bᵀ (``lora_linear``)
    cublas: C = b + s·xa·Bᵀ and xa from one pass over x (``lora_shrink_expand``), then cuBLAS adds
            x·Wᵀ onto C in its epilogue (beta = 1): two launches
    tma:    ``lora_shrink``, then the persistent TMA matmul with the same epilogue (``lora_linear_tma``),
            no M × N intermediate; operands it cannot take (``tma_ok``) go the cuBLAS route, and so
            does what the TMA matmul would run on narrow tiles (``tma_wide``), which lost to cuBLAS
Backward (dY (M, N)), the same routes:
    dX  = dY·W + s·(dyb·A) ⊙ keep/(1-p) with dyb = dY·B   triton: lora_shrink + lora_linear;
                                                         cublas: lora_shrink_expand + addmm;
                                                         tma: lora_shrink + lora_linear_tma
    dA  = s·dybᵀ·drop(x), dB = s·dYᵀ·xa                  lora_adapter_grads: one launch
Saved: x (a reference, no copy), xa (M × R fp32), the seed — no mask, no dropped copy of x; the mask
is regenerated from the seed in every kernel that needs it. Gradients that are not needed (x, A or
B not requiring grad) are skipped.

Eager calls go through ``LoraLinearFunction`` (least Python overhead); under ``torch.compile`` the
same implementation is reached through the custom op ``fastpeft::lora_linear`` (with a fake
implementation and registered autograd), so a patched model traces without graph breaks.

``LoraMLPFunction``: a GLU MLP down(act(gate(x)) · up(x)) with LoRA on all three projections, the
same pieces in one autograd node; it saves g = gate(x) and u = up(x) but not h = act(g) · u, which
its backward rebuilds in the pass that computes dg and du (kernels/activation.py) — one M ×
intermediate tensor less than the frozen model keeps for its own activation and product, two less
than three separate LoRA layers.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .kernels import activation as A
from .kernels.common import pdl_ok
from .kernels.grads import lora_adapter_grads
from .kernels.launch import env
from .kernels.linear import lora_linear as lora_linear_kernel
from .kernels.linear import lora_linear_tma, tma_ok, tma_wide
from .kernels.shrink import lora_shrink
from .kernels.shrink_expand import lora_shrink_expand

# From this many rows up cuBLAS onto a prefilled C beats the fused Triton matmul. Measured on an H100
# (bench/NOTES.md): Triton's best tile reached 69% of cuBLAS at M = 16384; at M = 256 the Triton
# route's forward took 41 µs of GPU time against 116 µs for the cuBLAS route's one-pass C.
CUBLAS_MIN_M = 512


# From this many rows up the auto route is the persistent TMA matmul where it takes the operands and
# runs its wide tiles (0: never). FASTPEFT_TMA_MIN_M moves it. On an H200 (session 9, two runs each,
# bench/NOTES.md), once its launch stopped encoding the weight's and activations' descriptors per
# call: the training step (M = 8192) 55.6 / 55.5 -> 53.9 / 53.6 ms at dropout 0 and 57.5 / 57.9 ->
# 56.6 / 57.0 at 0.05; the layer at M = 4096 forward 1.23-1.31 -> 1.09-1.19x F.linear.
TMA_MIN_M = 4096


def main_matmul(M: int, wide_tma: bool = True) -> str:
    """'triton' (fused epilogue), 'cublas' (onto a prefilled C) or 'tma' (the persistent TMA matmul with
    the LoRA epilogue, Hopper on; other operands take the cuBLAS route) for an M-row product.
    ``wide_tma``: whether the TMA matmul would run its wide tiles (``kernels.linear.tma_wide``: bf16
    outputs); the auto route takes its narrow ones nowhere, since they lost to cuBLAS (bench/NOTES.md).

    FASTPEFT_GEMM=triton|cublas|tma pins one (the cuBLAS path also runs on CPU, via torch's addmm).
    """
    choice = env("FASTPEFT_GEMM", "auto")
    if choice == "auto":
        if M < CUBLAS_MIN_M:
            return "triton"
        tma_min = env("FASTPEFT_TMA_MIN_M", str(TMA_MIN_M))
        if not tma_min.isdigit():
            raise ValueError(f"FASTPEFT_TMA_MIN_M must be a row count (0: never), got {tma_min!r}")
        return "tma" if wide_tma and 0 < int(tma_min) <= M else "cublas"
    if choice not in ("triton", "cublas", "tma"):
        raise ValueError(f"FASTPEFT_GEMM must be auto, triton, cublas or tma, got {choice!r}")
    return choice


def pdl(device: torch.device) -> bool:
    """Whether the Triton route's matmul after a shrink is launched with programmatic dependent launch
    (Hopper on): its main loop streams W while the shrink finishes, and it waits for the shrink
    before its epilogue. Measured on an H200 (scripts/diag.py pdl, graph replay, K = N = 4096, r = 16):
    forward at M = 1 / 16 / 256 24.9 / 25.3 / 36.3 -> 23.8 / 23.6 / 33.6 µs. Not on the TMA route,
    where it measured no gain (M >= 4096). FASTPEFT_PDL=0 turns it off."""
    return env("FASTPEFT_PDL", "1") == "1" and pdl_ok(device)


_DROPOUT_ARGS: dict = {}  # p -> (threshold, scale)


def _dropout_args(dropout_p: float, seed):
    """(seed or None, the mask's threshold, the kept values' scale) for the kernels."""
    if seed is None or dropout_p == 0.0:
        return None, 0, 1.0
    args = _DROPOUT_ARGS.get(dropout_p)
    if args is None:
        args = _DROPOUT_ARGS[dropout_p] = (reference.dropout_threshold(dropout_p), reference.dropout_scale(dropout_p))
    return seed, args[0], args[1]


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is a no-op (a dispatcher round trip each on the host)."""
    return t if t.dtype == dtype else t.to(dtype)


def _check(x, weight, bias, lora_a, lora_b):
    Kx = x.shape[-1]
    R, Ka = lora_a.shape
    N, Rb = lora_b.shape
    if Ka != Kx or Rb != R:
        raise ValueError(f"LoRA shapes do not fit: x (..., {Kx}), lora_A {tuple(lora_a.shape)} (want (r, {Kx})), "
                         f"lora_B {tuple(lora_b.shape)} (want (out, r={R}))")
    if weight is not None and tuple(weight.shape) != (N, Kx):
        raise ValueError(f"base weight is {tuple(weight.shape)} but x has {Kx} features and lora_B {N} outputs")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    device = x.device
    if any(t is not None and t.device != device for t in (weight, bias, lora_a, lora_b)):
        devices = {str(t.device) for t in (x, weight, bias, lora_a, lora_b) if t is not None}
        raise ValueError(f"LoRA tensors are on different devices: {sorted(devices)}")


def forward_impl(x2, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float, seed):
    """(y2 (M, N), xa (M, R) fp32) for a 2-D x; weight None computes the LoRA branch alone."""
    seed, threshold, drop_scale = _dropout_args(dropout_p, seed)
    M = x2.shape[0]
    route = main_matmul(M, tma_wide(x2.dtype, False)) if weight is not None else "cublas"
    if route == "tma":
        w = _as(weight, x2.dtype)
        if tma_ok(x2, w):
            parts = lora_shrink(x2, lora_a, seed, threshold, drop_scale, partial=True)
            return lora_linear_tma(x2, w, bias, parts, lora_b, scaling)
    if route == "triton":
        overlap = pdl(x2.device)
        parts = lora_shrink(x2, lora_a, seed, threshold, drop_scale, launch_dependents=overlap, partial=True)
        return lora_linear_kernel(x2, weight, bias, parts, lora_b, scaling, pdl=overlap)
    # C = b + s·drop(x)Aᵀ·Bᵀ in one pass; then (with a base) cuBLAS adds x·Wᵀ onto it (beta = 1)
    y, xa = lora_shrink_expand(x2, lora_a, lora_b, bias, scaling, seed, threshold, drop_scale)
    if weight is not None:
        y.addmm_(x2, _as(weight.t(), x2.dtype))
    return y, xa


def backward_impl(dy2, x2, weight, lora_a, lora_b, xa, scaling: float, dropout_p: float, seed,
                  need_dx: bool, need_da: bool, need_db: bool, dx_into=None):
    """(dx2, dA, dB), each None when not needed; dA/dB in the adapters' dtype. With ``dx_into`` (a
    dX of the same input, from another projection) dX is added into it, which is returned."""
    dx, dyb = backward_dx(dy2, x2.dtype, weight, lora_a, lora_b, scaling, dropout_p, seed, need_dx, need_da,
                          dx_into)
    return (dx, *adapter_grads(dy2, x2, dyb, lora_a, lora_b, xa, scaling, dropout_p, seed, need_da, need_db))


def backward_dx(dy2, x_dtype, weight, lora_a, lora_b, scaling: float, dropout_p: float, seed, need_dx: bool,
                need_da: bool, dx_into=None):
    """backward_impl's first half: (dx2 in ``x_dtype`` or None, dyb = dY·B (M, R) fp32 where dA needs it)."""
    seed, threshold, drop_scale = _dropout_args(dropout_p, seed)
    M = dy2.shape[0]
    dx = dyb = None
    route = main_matmul(M, tma_wide(x_dtype, seed is not None)) if need_dx and weight is not None else "cublas"
    wt = _as(weight, dy2.dtype).t() if route == "tma" else None
    if route == "tma" and tma_ok(dy2, wt):
        parts = lora_shrink(dy2, lora_b.t(), partial=True)
        into = dx_into is not None and tma_ok(dx_into, wt)  # dX added into it by the kernel
        dx, dyb = lora_linear_tma(dy2, wt, None, parts, lora_a.t(), scaling, seed, threshold, drop_scale,
                                  out_dtype=x_dtype, mask_output=True, accumulate=dx_into if into else None)
        dx = dx if dx_into is None or into else dx_into.add_(dx)
    elif need_dx:
        if route == "triton":
            overlap = pdl(dy2.device)
            parts = lora_shrink(dy2, lora_b.t(), launch_dependents=overlap, partial=True)
            dx, dyb = lora_linear_kernel(dy2, weight.t(), None, parts, lora_a.t(), scaling, seed, threshold,
                                         drop_scale, out_dtype=x_dtype, mask_output=True, pdl=overlap)
            dx = dx if dx_into is None else dx_into.add_(dx)
        else:
            dx, dyb = lora_shrink_expand(dy2, lora_b.t(), lora_a.t(), None, scaling, seed, threshold, drop_scale,
                                         mask_output=True, out_dtype=x_dtype, accumulate=dx_into)
            if weight is not None:
                dx.addmm_(dy2, _as(weight, dy2.dtype))
    elif need_da:
        dyb = lora_shrink(dy2, lora_b.t())
    return dx, dyb


def adapter_grads(dy2, x2, dyb, lora_a, lora_b, xa, scaling: float, dropout_p: float, seed, need_da: bool,
                  need_db: bool):
    """backward_impl's second half: (dA, dB) in the adapters' dtypes, each None when not needed; x2 and
    dyb are read only for dA, dy2 and xa only for dB."""
    if not (need_da or need_db):
        return None, None
    seed, threshold, drop_scale = _dropout_args(dropout_p, seed)
    da, db = lora_adapter_grads(x2 if need_da else None, dyb if need_da else None,
                                dy2 if need_db else None, xa if need_db else None, scaling,
                                seed, threshold, drop_scale)
    return (None if da is None else _as(da, lora_a.dtype)), (None if db is None else _as(db, lora_b.dtype))


def _forward_nd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    """forward_impl on x of any rank: (y (..., N), xa (M, R))."""
    y2, xa = forward_impl(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    return y2.reshape(*x.shape[:-1], y2.shape[-1]), xa


def _lora_grads_nd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, need_dx, need_da, need_db):
    """backward_impl on x, dy of any rank: (dx (x's shape) or None, dA or None, dB or None)."""
    dx, da, db = backward_impl(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b,
                               xa, scaling, dropout_p, seed, need_dx, need_da, need_db)
    return (None if dx is None else dx.reshape(x.shape)), da, db


def _save(ctx, x, weight, bias, lora_a, lora_b, xa, seed, scaling, dropout_p):
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, xa, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _grads(ctx, dy, lora_grads):
    """All input gradients from what ``_save`` kept; ``lora_grads`` computes dx, dA, dB (eager or custom op)."""
    x, weight, bias, lora_a, lora_b, xa, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, da, db = lora_grads(dy, x, weight, lora_a, lora_b, xa, ctx.scaling, ctx.dropout_p, seed,
                            need[0], need[3], need[4])
    dw = dbias = None
    if (weight is not None and need[1]) or (bias is not None and need[2]):  # a trainable base (rare)
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dw = (dy2.t().to(weight.dtype) @ x2.to(weight.dtype)) if weight is not None and need[1] else None
        dbias = dy2.sum(0).to(bias.dtype) if bias is not None and need[2] else None
    return (dx if need[0] else None, dw, dbias, da if need[3] else None, db if need[4] else None, None, None, None)


_FUNCTION_APPLY = getattr(torch._C, "_FunctionBase", None)
_FUNCTION_APPLY = None if _FUNCTION_APPLY is None else _FUNCTION_APPLY.__dict__.get("apply")


def _apply(fn, *args):
    """``fn.apply(*args)`` minus the Python wrapper's per-call work (binding defaults, unwrapping
    functorch's dead wrappers), which matters only under functorch transforms; those take
    ``Function.apply`` as always."""
    if _FUNCTION_APPLY is None or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return _FUNCTION_APPLY.__get__(None, fn)(*args)


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
        y, xa = _forward_nd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
        _save(ctx, x, weight, bias, lora_a, lora_b, xa, seed, scaling, dropout_p)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _lora_grads_nd)


# --- the same implementation as torch custom ops, for torch.compile -------------------------
@torch.library.custom_op("fastpeft::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout_p: float,
                    seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_nd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(*x.shape[:-1], lora_b.shape[0]), x.new_empty(M, lora_a.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastpeft::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                             lora_a: torch.Tensor, lora_b: torch.Tensor, xa: torch.Tensor, scaling: float,
                             dropout_p: float, seed: Optional[torch.Tensor], need_dx: bool, need_da: bool,
                             need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _lora_grads_nd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, need_dx, need_da, need_db)
    # a custom op returns tensors: the gradients not asked for come back empty
    return tuple(t.new_empty(0) if g is None else g for g, t in zip(grads, (x, lora_a, lora_b)))


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, need_dx, need_da, need_db):
    return tuple(torch.empty_like(t) if need else t.new_empty(0)
                 for need, t in zip((need_dx, need_da, need_db), (x, lora_a, lora_b)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed = inputs
    _save(ctx, x, weight, bias, lora_a, lora_b, output[1], seed, scaling, dropout_p)


def _backward(ctx, dy, _dxa):
    return _grads(ctx, dy, torch.ops.fastpeft.lora_linear_backward)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0, seed=None):
    """Fused y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ (weight None: the LoRA branch alone); autograd-aware."""
    _check(x, weight, bias, lora_a, lora_b)
    if torch.compiler.is_compiling():
        return torch.ops.fastpeft.lora_linear(x, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), seed)[0]
    return _apply(LoraLinearFunction, x, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), seed)


# --- projections of one input as one op (q, k, v) ----------------------------------------------
class LoraGroupFunction(torch.autograd.Function):
    """The LoRA projections y_i = x·W_iᵀ + b_i + s_i·(drop_i(x)·A_iᵀ)·B_iᵀ of one input x (q, k and v
    of an attention block, fastpeft/group.py) as one autograd node: forward_impl for each; backward
    adds every projection's dX into one buffer (the C pass accumulates, cuBLAS adds onto it) instead
    of autograd summing separate dX tensors.

    Inputs: x, then (lora_A, lora_B, weight, bias, seed) per projection, then (scalings, dropout ps).
    Saved: x, each xa, the adapters, weights and seeds. Outputs that are never used get no gradient.
    """

    @staticmethod
    def forward(ctx, x, *args):
        scalings, ps = args[-2:]
        x2 = x.reshape(-1, x.shape[-1])
        ys, xas = [], []
        for i in range(len(scalings)):
            a, b, w, bias, seed = args[5 * i:5 * i + 5]
            y, xa = forward_impl(x2, w, bias, a, b, scalings[i], ps[i], seed)
            ys.append(y.reshape(*x.shape[:-1], y.shape[-1]))
            xas.append(xa)
        ctx.save_for_backward(x, *xas, *args[:-2])
        ctx.scalings, ctx.ps = scalings, ps
        ctx.set_materialize_grads(False)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        saved = ctx.saved_tensors
        n = len(ctx.scalings)
        x, xas, params = saved[0], saved[1:1 + n], saved[1 + n:]
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        dx = None
        grads = [None] * (len(need) - 1)
        for i, dy in enumerate(dys):
            if dy is None:
                continue
            a, b, w, _, seed = params[5 * i:5 * i + 5]
            dxi, da, db = backward_impl(dy.reshape(-1, dy.shape[-1]), x2, w, a, b, xas[i], ctx.scalings[i],
                                        ctx.ps[i], seed, need[0], need[1 + 5 * i], need[2 + 5 * i], dx_into=dx)
            dx = dxi if dx is None else dx
            grads[5 * i], grads[5 * i + 1] = da, db
        return (None if dx is None else dx.reshape(x.shape), *grads)


def lora_group(x, projections, seeds):
    """The projections of one input as one op: ``projections`` = (weight, bias, lora_A, lora_B,
    scaling, dropout p) each (frozen weights and biases), ``seeds`` their dropout seeds (None without
    dropout); returns their outputs."""
    args = []
    for (w, bias, a, b, _, _), seed in zip(projections, seeds):
        _check(x, w, bias, a, b)
        args += [a, b, w, bias, seed]
    scalings = tuple(float(p[4]) for p in projections)
    ps = tuple(float(p[5]) if seed is not None else 0.0 for p, seed in zip(projections, seeds))
    return _apply(LoraGroupFunction, x, *args, scalings, ps)


# --- the fused GLU MLP ------------------------------------------------------------------------
class LoraMLPFunction(torch.autograd.Function):
    """down(act(gate(x)) · up(x)), each projection y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ (forward_impl).

    Inputs: x, the six adapter matrices (gate A, B, up A, B, down A, B), the three frozen weights and
    biases, the three dropout seeds (None without dropout), and (scalings, dropout ps, act).
    Saved: x, g, u, the three xa, the seeds. Backward: dh = dY·W_d + LoRA term (``backward_dx``);
    one elementwise kernel gives (dg, du), dg over dh, and h rebuilt from g and u for down's dA
    (``adapter_grads``); dX = gate's dX with up's added into it (backward_impl's dx_into).
    """

    @staticmethod
    def forward(ctx, x, ga, gb, ua, ub, da, db, gw, gbias, uw, ubias, dw, dbias, sdg, sdu, sdd, scalings, ps, act):
        x2 = x.reshape(-1, x.shape[-1])
        g, xa_g = forward_impl(x2, gw, gbias, ga, gb, scalings[0], ps[0], sdg)
        u, xa_u = forward_impl(x2, uw, ubias, ua, ub, scalings[1], ps[1], sdu)
        h = A.gated_act(g, u, act)
        y, xa_d = forward_impl(h, dw, dbias, da, db, scalings[2], ps[2], sdd)
        ctx.save_for_backward(x, g, u, xa_g, xa_u, xa_d, ga, gb, ua, ub, da, db, gw, uw, dw, sdg, sdu, sdd)
        ctx.scalings, ctx.ps, ctx.act = scalings, ps, act
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, g, u, xa_g, xa_u, xa_d, ga, gb, ua, ub, da, db, gw, uw, dw, sdg, sdu, sdd = ctx.saved_tensors
        need = ctx.needs_input_grad
        (sg, su, sd), (pg, pu, pd) = ctx.scalings, ctx.ps
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh, dyb_d = backward_dx(dy2, g.dtype, dw, da, db, sd, pd, sdd, True, need[5])
        # dg over dh; h (for down's dA only) rebuilt by the same pass
        dg, du, *h = A.gated_act_backward(g, u, dh, ctx.act, with_h=need[5], into_dh=dh.dtype == g.dtype)
        del dh
        dda, ddb = adapter_grads(dy2, h[0] if h else None, dyb_d, da, db, xa_d, sd, pd, sdd, need[5], need[6])
        del h
        dxg, dga, dgb = backward_impl(dg, x2, gw, ga, gb, xa_g, sg, pg, sdg, need[0], need[1], need[2])
        dx, dua, dub = backward_impl(du, x2, uw, ua, ub, xa_u, su, pu, sdu, need[0], need[3], need[4], dx_into=dxg)
        dx = dx.reshape(x.shape) if need[0] else None
        return (dx, dga, dgb, dua, dub, dda, ddb) + (None,) * 12


def lora_mlp(x, act: str, projections, seeds):
    """Fused down(act(gate(x)) · up(x)); ``projections`` = three (weight, bias, lora_A, lora_B,
    scaling, dropout p) for gate, up, down (frozen weights and biases); ``seeds``: their three dropout
    seeds (each None without dropout)."""
    (gw, gbias, ga, gb, gs, gp), (uw, ubias, ua, ub, us, up), (dw, dbias, da, db, ds, dp) = projections
    _check(x, gw, gbias, ga, gb)
    _check(x, uw, ubias, ua, ub)
    _check(x.new_empty(0, dw.shape[1]), dw, dbias, da, db)  # down's input: the intermediate features
    if gw.shape != uw.shape or dw.shape[1] != gw.shape[0]:
        raise ValueError(f"GLU MLP weights do not fit: gate {tuple(gw.shape)}, up {tuple(uw.shape)}, down "
                         f"{tuple(dw.shape)} (want (I, H), (I, H), (H, I))")
    return _apply(LoraMLPFunction, x, ga, gb, ua, ub, da, db, gw, gbias, uw, ubias, dw, dbias, *seeds,
                                 (float(gs), float(us), float(ds)), (float(gp), float(up), float(dp)), act)
