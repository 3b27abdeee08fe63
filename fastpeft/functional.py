"""Functional LoRA, DoRA and (IA)³ linears: pick the fused kernels or the reference path (fastpeft/backend.py)."""
from __future__ import annotations

import torch

from . import reference
from .backend import use_triton


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh 64-bit Philox seed from torch's generator on ``device``.

    Drawn as a device tensor so that ``torch.manual_seed`` reproduces it, activation checkpointing
    (which restores the RNG state) recomputes the same mask, and CUDA graphs replay fresh seeds.
    """
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)


def _autocast(x):
    device = x.device
    if torch.is_autocast_enabled(device.type):
        return x.to(torch.get_autocast_dtype(device.type))
    return x


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0, training: bool = False,
                backend=None):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ; weight (N, K) (a Conv1D weight as its transpose view, a 4-bit
    weight as its qlora.Base4bit).

    Dropout applies only in training mode with p > 0. ``backend``: a model's option (None: the process's).
    """
    x = _autocast(x)
    seed = draw_dropout_seed(x.device) if (training and dropout_p > 0.0) else None
    if use_triton(x, backend):
        from . import ops

        return ops.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p if seed is not None else 0.0, seed)
    if weight is not None and not isinstance(weight, torch.Tensor):  # a 4-bit base (qlora.Base4bit)
        return reference.qlora_linear(x, weight.packed, weight.state, bias, lora_a, lora_b, scaling, dropout_p, seed,
                                      weight.compute_dtype)
    return reference.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


def dora_linear(owner, x, weight, bias, lora_a, lora_b, magnitude, scaling: float, dropout_p: float = 0.0,
                training: bool = False, backend=None):
    """DoRA: y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b with g = m / ‖W + s·B·A‖ per output row (PEFT's forms with
    dropout in fastpeft/dora.py); ``owner``: the magnitude's module (it keeps ‖W‖²_row). Dropout and
    autocast as in ``lora_linear``."""
    from . import dora

    x = _autocast(x)
    seed = draw_dropout_seed(x.device) if (training and dropout_p > 0.0) else None
    return dora.dora_linear(owner, x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p, seed, backend)


def ia3_linear(x, weight, bias, scale, feedforward: bool, backend=None):
    """(IA)³: y = (x ⊙ l)·Wᵀ + b (``feedforward``, ``scale`` (K,)) or (x·Wᵀ + b) ⊙ l (``scale`` (N,));
    weight (N, K) (a Conv1D weight as its transpose view). fastpeft/ia3.py (cuBLAS and kernels/ia3.py)
    where the backend takes the kernels, else the reference (PEFT's expression), which also serves a
    base that needs grad (fastpeft/ia3.py computes no dW) and ``torch.compile`` (whose own fusion covers
    the elementwise parts). Under autocast x, W and b are cast to its dtype first."""
    x = _autocast(x)
    if x.dtype != weight.dtype and torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    trainable_base = weight.requires_grad or (bias is not None and bias.requires_grad)
    if use_triton(x, backend) and not trainable_base and not torch.compiler.is_compiling():
        from . import ia3

        return ia3.ia3_linear(x, weight, bias, scale, feedforward)
    return reference.ia3_linear(x, weight, bias, scale, feedforward)


def lora_mlp(x, act: str, projections, training: bool = False):
    """down(act(gate(x)) · up(x)) through the fused kernels; ``projections`` = three (weight, bias,
    lora_A, lora_B, scaling, dropout p) for gate, up, down. Kernels only (fastpeft/mlp.py decides)."""
    from . import ops

    x = _autocast(x)
    if not training:
        projections = [proj[:5] + (0.0,) for proj in projections]
    # one seed per projection, drawn in the order the unfused MLP draws them (gate, up, down): the
    # fused and the unfused MLP, and the reference path, apply the same dropout masks
    seeds = [draw_dropout_seed(x.device) if proj[5] > 0.0 else None for proj in projections]
    return ops.lora_mlp(x, act, projections, seeds)


def lora_group(x, projections):
    """The outputs of several LoRA projections of one input through one fused op; ``projections`` =
    (weight, bias, lora_A, lora_B, scaling, dropout p) each, p = 0 outside training. Kernels only
    (fastpeft/group.py decides); the seeds are drawn in the projections' order, as separate layers
    draw them."""
    from . import ops

    x = _autocast(x)
    seeds = [draw_dropout_seed(x.device) if proj[5] > 0.0 else None for proj in projections]
    return ops.lora_group(x, projections, seeds)
