"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) on fastpeft's fused LoRA kernels.

PEFT's DoRA linear, with g = m / ‖W + s·B·A‖ per output row (m the trained magnitude (N,), the norm
detached, as the paper and PEFT have it):

    eval, or dropout 0:   y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b
    training, dropout p:  y = x·Wᵀ + b + (g - 1) ⊙ (x̃·Wᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ,   x̃ = drop(x)

The row norms are computed without forming W + s·BA (PEFT multiplies an identity matrix through
both adapters and adds the dense product to W every forward):

    ‖W + s·BA‖²_row = ‖W‖²_row + 2s·rowsum(B ⊙ (W·Aᵀ)) + s²·rowsum((B·(A·Aᵀ)) ⊙ B)

‖W‖²_row is kept per frozen weight (rebuilt when its data changes); the rest is one pass over W with
r output columns (W·Aᵀ), B·(A·Aᵀ), and one kernel for the row sums, the root and g (kernels/dora.py).

``DoraFunction`` (eval, or dropout 0): z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ from the fused LoRA forward (route.py: the
dense or 4-bit base routes), y = g ⊙ z + b in one pass (the column scale of kernels/ia3.py, which
(IA)³ uses too); it saves z. Backward: one pass gives dz = g ⊙ dY and Σ_tokens dY ⊙ z (so dm = that /
‖·‖), dz goes into the fused LoRA backward (dX, dA, dB). With dropout in training DoRA needs the base
product of x̃ as well as of x, by definition: that path is PEFT's algorithm in torch ops (F.linear on
the base, fastpeft's dropout mask) with the norm above. The reference path (CPU, torch.compile) is
``reference.dora_linear``, PEFT's own computation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from .backend import use_triton


class DoraMagnitude(nn.Module):
    """PEFT's ``lora_magnitude_vector[adapter]``: the magnitude m as ``weight`` (out_features,)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


def dense_weight(weight, dtype=None) -> torch.Tensor:
    """The base weight (N, K) as a tensor: a 4-bit base (qlora.Base4bit) dequantized in ``dtype`` (its
    compute dtype when None)."""
    if isinstance(weight, torch.Tensor):
        return weight
    return weight.dequantized(dtype or weight.compute_dtype)


_ROW_SQ = "_fastpeft_dora_row_sq"  # on the magnitude module: (weight key, ‖W‖²_row fp32)


def _row_sq(owner: nn.Module, weight, w: torch.Tensor) -> torch.Tensor:
    """‖W‖² per row (N,) fp32 of the frozen base ``weight`` (``w``: it as a dense tensor), kept on
    ``owner`` until W's data changes."""
    probe = weight if isinstance(weight, torch.Tensor) else weight.packed
    key = (probe.data_ptr(), probe._version, tuple(probe.shape), id(weight) if probe is not weight else None)
    cached = owner.__dict__.get(_ROW_SQ)
    if cached is not None and cached[0] == key:
        return cached[1]
    sq = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, (1 << 24) // max(w.shape[1], 1))  # rows per chunk: no fp32 copy of the whole of W
    for i in range(0, w.shape[0], step):
        sq[i:i + step] = w[i:i + step].float().square().sum(1)
    owner.__dict__[_ROW_SQ] = (key, sq)
    return sq


@torch.no_grad()
def norm_and_scale(owner: nn.Module, weight, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor,
                   scaling: float, kernels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖W + s·B·A‖ per output row, g = m / that), both (N,) fp32 and detached, from ‖W‖²_row (kept on
    ``owner``), W·Aᵀ (one pass over W) and B·(A·Aᵀ); ``kernels``: the last step in one launch
    (kernels/dora.py dora_norm), else torch ops."""
    w = dense_weight(weight)
    sq = _row_sq(owner, weight, w)
    a = lora_a.to(w.dtype) if w.is_cuda else lora_a.float()
    wa = F.linear(a, w if w.is_cuda else w.float())  # (r, N)
    af, bf = lora_a.float(), lora_b.float()
    h = bf @ (af @ af.t())  # (N, r)
    if kernels:
        from .kernels.dora import dora_norm

        return dora_norm(sq, wa, lora_b, h, magnitude.detach(), scaling)
    n2 = sq + (bf * ((2 * scaling) * wa.float().t() + (scaling * scaling) * h)).sum(1)
    norm = n2.clamp_min_(0).sqrt_()
    return norm, magnitude.detach().float() / norm


class DoraFunction(torch.autograd.Function):
    """y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, g = m / norm; the fused LoRA forward and backward inside."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, scaling, norm, g):
        from . import ops
        from .kernels.ia3 import ia3_scale

        x2 = x.reshape(-1, x.shape[-1])
        z, xa = ops.forward_impl(x2, weight, None, lora_a, lora_b, scaling, 0.0, None)
        y = ia3_scale(z, g, bias)
        ctx.save_for_backward(x, *ops._tensor_bases(ctx, (weight,)), bias, lora_a, lora_b, xa, z, g, norm)
        ctx.scaling, ctx.m_dtype = scaling, magnitude.dtype
        return y.reshape(*x.shape[:-1], z.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from . import ops
        from .kernels.ia3 import ia3_scale_backward

        x, weight, bias, lora_a, lora_b, xa, z, g, norm = ctx.saved_tensors
        (weight,) = ops._restore_bases(ctx, (weight,))
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        dz, dg = ia3_scale_backward(dy2, z, g, dy.dtype, True, need[5])
        dx, da, db = ops.backward_impl(dz, x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b, xa, ctx.scaling, 0.0,
                                       None, need[0], need[3], need[4])
        dm = (dg / norm).to(ctx.m_dtype) if need[5] else None
        dbias = dy2.sum(0).to(bias.dtype) if bias is not None and need[2] else None
        return (None if dx is None else dx.reshape(x.shape)), None, dbias, da, db, dm, None, None, None


class _Dropout(torch.autograd.Function):
    """x̃ = drop(x) with the kernels' mask (kernels/dropout.py), its backward the same mask on dX̃."""

    @staticmethod
    def forward(ctx, x, seed, threshold, scale):
        from .kernels.dropout import dropout_apply

        ctx.save_for_backward(seed)
        ctx.threshold, ctx.scale = threshold, scale
        return dropout_apply(x, seed, threshold, scale)

    @staticmethod
    def backward(ctx, dxd):
        from .kernels.dropout import dropout_apply

        (seed,) = ctx.saved_tensors
        return dropout_apply(dxd, seed, ctx.threshold, ctx.scale), None, None, None


def _dropout_forward(x, weight, bias, lora_a, lora_b, magnitude, scaling, norm, dropout_p, seed):
    """PEFT's DoRA in training with dropout, in torch ops: two base products (x and x̃), the LoRA branch
    of x̃ in the adapters' dtype, the DoRA terms in fp32; x̃ drawn by the kernels' mask."""
    w = dense_weight(weight, x.dtype)
    base = F.linear(x, w, bias)
    xd = _Dropout.apply(x.to(lora_a.dtype), seed, reference.dropout_threshold(dropout_p),
                        reference.dropout_scale(dropout_p))
    g = (magnitude / norm.to(magnitude.dtype)).float()
    lora = F.linear(F.linear(xd, lora_a), lora_b).float() * scaling
    extra = (g - 1) * F.linear(xd.to(w.dtype), w).float() + g * lora
    return (base.float() + extra).to(x.dtype)


def dora_linear(owner: nn.Module, x: torch.Tensor, weight, bias, lora_a, lora_b, magnitude: torch.Tensor,
                scaling: float, dropout_p: float, seed, backend=None) -> torch.Tensor:
    """DoRA's output for x (..., K): the kernels (``DoraFunction``, or the dropout path in training)
    where ``use_triton``, else PEFT's computation (``reference.dora_linear``). ``owner``: the magnitude's
    module (it keeps ‖W‖²_row); ``seed``: the dropout seed, None without dropout (``functional.dora_linear``
    draws it)."""
    if not use_triton(x, backend) or torch.compiler.is_compiling():
        return reference.dora_linear(x, dense_weight(weight), bias, lora_a, lora_b, magnitude, scaling, dropout_p,
                                     seed)
    norm, g = norm_and_scale(owner, weight, lora_a, lora_b, magnitude, scaling, kernels=True)
    if seed is not None and dropout_p > 0.0:
        return _dropout_forward(x, weight, bias, lora_a, lora_b, magnitude, scaling, norm, dropout_p, seed)
    from .ops import _apply

    return _apply(DoraFunction, x, weight, bias, lora_a, lora_b, magnitude, float(scaling), norm, g)
