"""Autograd for the fused LoRA linear: which kernels run, what is saved for backward.

Forward  (x (..., K), W (N, K), A (R, K), B (N, R)): y = x·Wᵀ + b + s·xa·Bᵀ with xa = drop(x)·Aᵀ,
         by the base weight's route (fastpeft/route.py: for a dense W the Triton, cuBLAS or TMA
         matmul with the LoRA term fused, by rows)
Backward (dY (M, N)):
    dX  = dY·W + s·(dyb·A) ⊙ keep/(1-p) with dyb = dY·B   the same route (``route.dx``)
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

from . import reference, route
from .kernels import activation as A
from .kernels.grads import lora_adapter_grads

_DROPOUT_ARGS: dict = {}  # p -> (threshold, scale)


def _dropout_args(dropout_p: float, seed):
    """(seed or None, the mask's threshold, the kept values' scale) for the kernels."""
    if seed is None or dropout_p == 0.0:
        return None, 0, 1.0
    args = _DROPOUT_ARGS.get(dropout_p)
    if args is None:
        args = _DROPOUT_ARGS[dropout_p] = (reference.dropout_threshold(dropout_p), reference.dropout_scale(dropout_p))
    return seed, args[0], args[1]


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
    return route.forward(x2, weight, bias, lora_a, lora_b, scaling, seed, threshold, drop_scale)


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
    return route.dx(dy2, x_dtype, weight, lora_a, lora_b, scaling, seed, threshold, drop_scale, need_dx, need_da,
                    dx_into)


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
    return (None if da is None else route.as_dtype(da, lora_a.dtype)), (None if db is None else route.as_dtype(db, lora_b.dtype))


def _forward_nd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    """forward_impl on x of any rank: (y (..., N), xa (M, R))."""
    y2, xa = forward_impl(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    return y2.reshape(*x.shape[:-1], y2.shape[-1]), xa


def _lora_grads_nd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, need_dx, need_da, need_db):
    """backward_impl on x, dy of any rank: (dx (x's shape) or None, dA or None, dB or None)."""
    dx, da, db = backward_impl(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b,
                               xa, scaling, dropout_p, seed, need_dx, need_da, need_db)
    return (None if dx is None else dx.reshape(x.shape)), da, db


def _tensor_bases(ctx, weights) -> tuple:
    """The base weights for ``save_for_backward``: a non-tensor base (a 4-bit weight, route.register)
    is kept on ``ctx.bases`` instead, None in its place; ``_restore_bases`` puts them back."""
    ctx.bases = tuple(None if w is None or isinstance(w, torch.Tensor) else w for w in weights)
    return tuple(w if b is None else None for w, b in zip(weights, ctx.bases))


def _restore_bases(ctx, weights) -> tuple:
    return tuple(w if b is None else b for w, b in zip(weights, ctx.bases))


def _save(ctx, x, weight, bias, lora_a, lora_b, xa, seed, scaling, dropout_p):
    ctx.save_for_backward(x, *_tensor_bases(ctx, (weight,)), bias, lora_a, lora_b, xa, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _grads(ctx, dy, lora_grads, need):
    """The gradients of (x, weight, bias, A, B, ...) from what ``_save`` kept; ``lora_grads`` computes
    dx, dA, dB (eager or custom op); ``need``: which of x, weight, bias, A, B need one."""
    x, weight, bias, lora_a, lora_b, xa, seed = ctx.saved_tensors
    (weight,) = _restore_bases(ctx, (weight,))
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
        return _grads(ctx, dy, _lora_grads_nd, ctx.needs_input_grad)


# --- the same implementation as torch custom ops, for torch.compile -------------------------
# The base weight enters as (weight, weight_state, weight_format) (route.op_args): a dense W is
# (W, [], "dense"); a quantized base its packed tensor, its state tensors and its format.
@torch.library.custom_op("fastpeft::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: Optional[torch.Tensor], weight_state: list[torch.Tensor],
                    weight_format: str, bias: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float, dropout_p: float, seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    weight = route.from_op_args(weight, weight_state, weight_format)
    return _forward_nd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


@_lora_linear_op.register_fake
def _(x, weight, weight_state, weight_format, bias, lora_a, lora_b, scaling, dropout_p, seed):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(*x.shape[:-1], lora_b.shape[0]), x.new_empty(M, lora_a.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastpeft::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                             weight_state: list[torch.Tensor], weight_format: str, lora_a: torch.Tensor,
                             lora_b: torch.Tensor, xa: torch.Tensor, scaling: float, dropout_p: float,
                             seed: Optional[torch.Tensor], need_dx: bool, need_da: bool,
                             need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = route.from_op_args(weight, weight_state, weight_format)
    grads = _lora_grads_nd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, need_dx, need_da, need_db)
    # a custom op returns tensors: the gradients not asked for come back empty
    return tuple(t.new_empty(0) if g is None else g for g, t in zip(grads, (x, lora_a, lora_b)))


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, weight_state, weight_format, lora_a, lora_b, xa, scaling, dropout_p, seed, need_dx, need_da,
      need_db):
    return tuple(torch.empty_like(t) if need else t.new_empty(0)
                 for need, t in zip((need_dx, need_da, need_db), (x, lora_a, lora_b)))


def _setup_context(ctx, inputs, output):
    x, weight, weight_state, weight_format, bias, lora_a, lora_b, scaling, dropout_p, seed = inputs
    ctx.n_state = len(weight_state)
    _save(ctx, x, route.from_op_args(weight, weight_state, weight_format), bias, lora_a, lora_b, output[1], seed,
          scaling, dropout_p)


def _op_grads(dy, x, weight, *args):
    return torch.ops.fastpeft.lora_linear_backward(dy, x, *route.op_args(weight), *args)


def _backward(ctx, dy, _dxa):
    need = ctx.needs_input_grad  # (x, weight, weight_state, weight_format, bias, A, B, ...)
    dx, dw, dbias, da, db = _grads(ctx, dy, _op_grads, (need[0], need[1], need[4], need[5], need[6]))[:5]
    return dx, dw, [None] * ctx.n_state, None, dbias, da, db, None, None, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0, seed=None):
    """Fused y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ (weight None: the LoRA branch alone); autograd-aware."""
    _check(x, weight, bias, lora_a, lora_b)
    if torch.compiler.is_compiling():
        return torch.ops.fastpeft.lora_linear(x, *route.op_args(weight), bias, lora_a, lora_b, float(scaling),
                                              float(dropout_p), seed)[0]
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
        params = list(args[:-2])
        params[2::5] = _tensor_bases(ctx, params[2::5])
        ctx.save_for_backward(x, *xas, *params)
        ctx.scalings, ctx.ps = scalings, ps
        ctx.set_materialize_grads(False)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        saved = ctx.saved_tensors
        n = len(ctx.scalings)
        x, xas, params = saved[0], saved[1:1 + n], list(saved[1 + n:])
        params[2::5] = _restore_bases(ctx, params[2::5])
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
        ctx.save_for_backward(x, g, u, xa_g, xa_u, xa_d, ga, gb, ua, ub, da, db, *_tensor_bases(ctx, (gw, uw, dw)),
                              sdg, sdu, sdd)
        ctx.scalings, ctx.ps, ctx.act = scalings, ps, act
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, g, u, xa_g, xa_u, xa_d, ga, gb, ua, ub, da, db, gw, uw, dw, sdg, sdu, sdd = ctx.saved_tensors
        gw, uw, dw = _restore_bases(ctx, (gw, uw, dw))
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
