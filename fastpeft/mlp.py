"""The GLU MLP of LLaMA-like models as one fused op, when LoRA wraps all three of its projections.

``fastpeft.patch`` installs :func:`gated_mlp_forward` as the ``forward`` of every module that
``models.gated_mlp_activation`` recognises (transformers' LlamaMLP and its copies) and whose
gate/up/down projections are LoRA layers. With gradients on it runs ``ops.LoraMLPFunction``, which
keeps gate(x) and up(x) for backward but not act(gate(x))·up(x): the MLP then holds less activation
memory than the frozen model's own. Anything it does not cover (no grad, several or merged or
disabled adapters, a trainable base weight or bias, a projection with forward hooks, the reference
backend, torch.compile, the ``fuse_mlp`` option off) runs the module's own forward, i.e. the three LoRA layers
one by one.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from . import functional, models, options
from .backend import use_triton
from .layer import has_lora, single_lora

FUSED_MLP_ATTR = "_fastpeft_fused_mlp"  # on each MLP module: the activation name


def fusable(mlp: nn.Module, x: torch.Tensor):
    """The three projections' (weight, bias, lora_A, lora_B, scaling, p), or None to run unfused."""
    opts = options.of(mlp)
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling() or not opts.fuse_mlp
            or not use_triton(x, opts.backend)
            or models.gated_mlp_activation(mlp) != mlp.__dict__[FUSED_MLP_ATTR]):
        return None
    layers = [getattr(mlp, name) for name in models.GATED_MLP_PROJECTIONS]
    if any(layer._forward_pre_hooks or layer._forward_hooks for layer in layers):
        return None  # hooks need the layers called (PEFT passes adapter_names= to its layers through pre-hooks)
    projections = [single_lora(layer) for layer in layers]
    return None if any(p is None for p in projections) else projections


def gated_mlp_forward(self, x):
    """Instance ``forward`` of a fused GLU MLP: the fused op, or the module's own forward."""
    projections = fusable(self, x)
    if projections is None:
        return type(self).forward(self, x)
    return functional.lora_mlp(x, self.__dict__[FUSED_MLP_ATTR], projections, self.training)


def install(model: nn.Module) -> None:
    """Install the fused forward on every GLU MLP of ``model`` whose three projections carry LoRA
    (again on a model that has it: nothing changes)."""
    for module in model.modules():
        if FUSED_MLP_ATTR in module.__dict__:
            continue
        act = models.gated_mlp_activation(module)
        if act is None or not all(has_lora(getattr(module, n, None)) for n in models.GATED_MLP_PROJECTIONS):
            continue
        module.forward = types.MethodType(gated_mlp_forward, module)
        module.__dict__[FUSED_MLP_ATTR] = act


def uninstall(modules) -> None:
    """Give the fused MLPs among ``modules`` (e.g. ``model.modules()``) their own forward back."""
    for module in modules:
        if module.__dict__.pop(FUSED_MLP_ATTR, None) is not None:
            module.__dict__.pop("forward", None)
