"""(IA)³ on a linear layer: a learned vector l scales the layer's input or its output.

Shapes: x (..., K), W (N, K) (a Conv1D weight as its transpose view), b (N,) or None; l (K,) on the
input (PEFT's ``is_feedforward``), (N,) on the output. The base is frozen; x and l may need grad.

Feedforward (l on the input):  y = (x ⊙ l)·Wᵀ + b
    forward   from as many rows M as W has outputs N: y = x·(W ⊙ l[None, :])ᵀ + b, scaling W's columns
              (N·K elements) once instead of x (M·K); below that, x ⊙ l then the matmul (PEFT's order)
    backward  g = dY·W (one matmul), dX = g ⊙ l, dl = Σ_rows g ⊙ x (one elementwise pass over g and x)
    saved     x (a reference, only where l needs grad), W (a reference), l
Output (l on the output, bias included, as PEFT does):  y = (x·Wᵀ + b) ⊙ l
    forward   yb = x·Wᵀ + b (cuBLAS), y = yb ⊙ l
    backward  dX = (dY ⊙ l)·W, dl = Σ_rows dY ⊙ yb (one elementwise pass over dY and yb, then the matmul)
    saved     yb (M × N, only where l needs grad: what PEFT's product saves too), W (a reference, only
              where x needs grad), l

The matmuls are cuBLAS' (``F.linear`` / ``matmul``); the elementwise parts are ``kernels/ia3.py``,
fp32 math with one rounding into each output, as PEFT's ``(t.to(l.dtype) * l).to(t.dtype)`` gives.
Gradients come back in x's and l's dtypes. ``functional.ia3_linear`` picks this path or the reference
(``reference.ia3_linear``: PEFT's own expression), and imports this module on first use;
``peft_bridge.ia3_forward`` is the instance ``forward`` ``patch(peft_model)`` gives PEFT's
``ia3.Linear`` layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels.ia3 import ia3_scale, ia3_scale_backward
from .ops import _apply


def _check(x, weight, bias, scale, feedforward: bool) -> None:
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"(IA)³: base weight is {tuple(weight.shape)} but x has {K} features (want (out, {K}))")
    N = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"(IA)³: bias must be ({N},), got {tuple(bias.shape)}")
    want = K if feedforward else N
    if tuple(scale.shape) != (want,):
        raise ValueError(f"(IA)³: the scale vector must be ({want},) ({'input' if feedforward else 'output'} "
                         f"features of a {N} × {K} layer), got {tuple(scale.shape)}")
    if any(t is not None and t.device != x.device for t in (weight, bias, scale)):
        devices = {str(t.device) for t in (x, weight, bias, scale) if t is not None}
        raise ValueError(f"(IA)³ tensors are on different devices: {sorted(devices)}")


def _forward(x2, weight, bias, scale, feedforward: bool):
    """(y2 (M, N), yb): yb = x·Wᵀ + b for the output case (None for feedforward)."""
    if feedforward:
        if x2.shape[0] >= weight.shape[0]:  # scaling W (N·K) costs no more than scaling x (M·K)
            return F.linear(x2, ia3_scale(weight, scale), bias), None
        return F.linear(ia3_scale(x2, scale), weight, bias), None
    yb = F.linear(x2, weight, bias)
    return ia3_scale(yb, scale), yb


class IA3LinearFunction(torch.autograd.Function):
    """y = (x ⊙ l)·Wᵀ + b (feedforward) or (x·Wᵀ + b) ⊙ l, with W and b frozen (no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, feedforward):
        x2 = x.reshape(-1, x.shape[-1])
        y2, yb = _forward(x2, weight, bias, scale, feedforward)
        need_dx, need_dl = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        if feedforward:
            ctx.save_for_backward(x if need_dl else None, weight, scale)
        else:
            ctx.save_for_backward(yb if need_dl else None, weight if need_dx else None, scale)
        ctx.feedforward, ctx.x_shape, ctx.x_dtype = feedforward, x.shape, x.dtype
        return y2.reshape(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        saved, weight, scale = ctx.saved_tensors
        need_dx, need_dl = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.feedforward:
            g = dy2 @ weight  # (M, K): the gradient of x ⊙ l
            v = saved.reshape(-1, saved.shape[-1]) if need_dl else g
            dx, dl = ia3_scale_backward(g, v, scale, ctx.x_dtype, need_dx, need_dl)
        else:
            dys, dl = ia3_scale_backward(dy2, saved if need_dl else dy2, scale, ctx.x_dtype, need_dx, need_dl)
            dx = dys @ weight if need_dx else None
        return (None if dx is None else dx.reshape(ctx.x_shape), None, None,
                None if dl is None else dl.to(scale.dtype), None)


def ia3_linear(x, weight, bias, scale, feedforward: bool):
    """(IA)³ linear through cuBLAS and kernels/ia3.py (see the module docstring); autograd-aware for x and
    ``scale``; weight and bias must not need grad (``functional.ia3_linear`` sends those to the reference)."""
    _check(x, weight, bias, scale, feedforward)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _apply(IA3LinearFunction, x, weight, bias, scale, bool(feedforward))
    y2, _ = _forward(x.reshape(-1, x.shape[-1]), weight, bias, scale, feedforward)
    return y2.reshape(*x.shape[:-1], y2.shape[-1])
