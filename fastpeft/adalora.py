"""AdaLoRA (PEFT's ``adalora.SVDLinear``) through fastpeft's fused LoRA op.

PEFT's forward adds, per active adapter, ``(drop(x)·(A ⊙ E)ᵀ·Bᵀ)·s / (ranknum + 1e-5)`` to the base
output: lora_A (r × in), lora_E (r × 1, the singular values RankAllocator masks in place), lora_B
(out × r), s = lora_alpha (or r when alpha is 0), ranknum (1,) a frozen parameter holding r. That is
LoRA with A' = A ⊙ (E / (ranknum + 1e-5)) (r × in): :func:`adapter_tensors` builds A' with one small
differentiable torch op per call (so dA and dE come from autograd through it, and a mask written into
lora_E shows at the next call), and ``layer.lora_forward`` / the fused MLP and q/k/v ops take it as
any LoRA adapter's A, with B and s as they are. The division sits in A' rather than in the scaling
so that no device value is read on the host (no synchronisation per layer, nothing for
``torch.compile`` to break on); products differ from PEFT's by rounding only.

PEFT's modules, parameter names, ``save_pretrained``, ``update_and_allocate`` (which reads the
gradients of lora_A, lora_B and lora_E) and the orthogonality regularizer (``AdaLoraModel.forward``,
over lora_A and lora_B) are left as they are. Layers that keep PEFT's forward: 4-bit / 8-bit / GPTQ
bases and Conv2d (other classes, fastpeft/peft_bridge.py), an active adapter of rank 0 (PEFT's
resize after a rank pattern can give one), extra forward arguments and input-dtype casting turned
off (``peft_fast_path_ok``).
"""
from __future__ import annotations

import torch.nn as nn


def is_adalora_layer(layer) -> bool:
    """Whether a LoRA-like layer is AdaLoRA's (it has singular values, ``lora_E``)."""
    return "lora_E" in layer._modules


def adapter_tensors(layer, name: str):
    """(A' = lora_A ⊙ lora_E / (ranknum + 1e-5) (r × in), lora_B (out × r), scaling, dropout p) of
    adapter ``name`` of an AdaLoRA layer: the arguments of the fused LoRA op."""
    a, e, b = layer.lora_A[name], layer.lora_E[name], layer.lora_B[name]
    drop = layer.lora_dropout[name]
    return (a * (e / (layer.ranknum[name] + 1e-5)), b, layer.scaling[name],
            drop.p if isinstance(drop, nn.Dropout) else 0.0)


def fast_path_ok(layer) -> bool:
    """Whether fastpeft computes exactly what PEFT's forward would for this AdaLoRA layer: every active
    adapter of rank > 0, no LoRA variant, input-dtype casting on."""
    if getattr(layer, "lora_variant", None):
        return False
    lora_a = layer.lora_A
    for name in layer.active_adapters:
        if name in lora_a and lora_a[name].shape[0] == 0:
            return False
    return getattr(layer, "cast_input_dtype_enabled", True)
