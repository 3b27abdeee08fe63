"""``patch(peft_model)``: a ``peft.PeftModel`` keeps PEFT's modules, parameters and names, and each PEFT
layer that fastpeft supports gets fastpeft's compute as an instance-level ``forward``, so
``save_pretrained``, ``merge_and_unload`` and ``transformers.Trainer`` keep working:

- LoRA (``lora.Linear``, QLoRA's ``lora.bnb.Linear4bit``), DoRA included: ``layer.lora_forward``, the
  fused LoRA op (DoRA's around it, fastpeft/dora.py);
  mixed-adapter batches (``adapter_names=``, which PEFT's hooks hand to each layer) run through
  fastpeft/multi_lora.py where every named adapter is plain LoRA; variant kwargs go through PEFT's
  forward.
- AdaLoRA (``adalora.SVDLinear``): the same fused op with A' = lora_A ⊙ lora_E / (ranknum + 1e-5)
  (fastpeft/adalora.py), the fused MLP and q/k/v ops included; ``update_and_allocate`` (RankAllocator
  masking lora_E in place) and the orthogonality regularizer are PEFT's own, untouched. An active
  adapter of rank 0, extra forward arguments (AdaLoRA has no mixed batches) and input-dtype casting
  turned off run PEFT's forward for that call.
- (IA)³ (``ia3.Linear``): fastpeft/ia3.py (cuBLAS and kernels/ia3.py), the vectors of several active
  adapters multiplied into one as PEFT does; extra forward arguments go through PEFT's forward.

Merged or disabled adapters compute what PEFT's forward does (the base alone). Layers fastpeft does not
support (other layer types: Conv2d / Embedding, 8-bit, AdaLoRA's and (IA)³'s 4-bit / 8-bit / GPTQ
classes, nested bases, LoRA variants other than DoRA, lora_bias) keep PEFT's forward, with one warning
naming them; a call fastpeft cannot compute exactly (several active adapters with a DoRA one among them)
goes to PEFT's forward. Prompt-based adapters (prompt / prefix / P-tuning, LLaMA-Adapter) have no linear layer to
fuse: they are left to PEFT's code with one notice. Other PEFT methods (LoHa, LoKr, OFT, BOFT, VeRA, ...)
raise a ValueError naming the method. ``unpatch`` gives every layer PEFT's forward back.
"""
from __future__ import annotations

import contextlib
import types
import warnings
from typing import Optional

import torch
import torch.nn as nn

from . import functional, models, options
from .layer import ACCELERATED_ATTR, SUPPORTED_VARIANTS, is_conv1d, lora_forward, peft_fast_path_ok
from .model_state import PEFT_PATCHED_ATTR, install_fused_forwards, is_peft_adapter_layer, uninstall_fused_forwards
from .options import Options
from .targets import check_wrappable, shorten_names


# PEFT's prompt-based methods: no linear layer to fuse; patch(peft_model) leaves them to PEFT's code
PROMPT_BASED = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT"}

# PEFT methods whose layers fastpeft computes (peft_config[...].peft_type)
ACCELERATED_TYPES = ("LORA", "ADALORA", "IA3")

# PEFT's LoRA layer classes whose forward fastpeft computes: over a float linear, and over a
# bitsandbytes 4-bit linear (QLoRA, fastpeft/qlora.py)
_PEFT_LINEAR_CLASSES = {("peft.tuners.lora.layer", "Linear"), ("peft.tuners.lora.bnb", "Linear4bit")}
# AdaLoRA's and (IA)³'s: over a float nn.Linear / Conv1D only
_PEFT_ADALORA_CLASSES = {("peft.tuners.adalora.layer", "SVDLinear")}
_PEFT_IA3_CLASSES = {("peft.tuners.ia3.layer", "Linear")}


def _accelerated_forward(self, x, *args, **kwargs):
    """Instance ``forward`` of a PEFT lora.Linear: fastpeft's compute, PEFT's for what it cannot do."""
    if set(kwargs) == {"adapter_names"} and kwargs["adapter_names"] is not None and _mixed_ok(self, kwargs["adapter_names"]):
        return lora_forward(self, x, *args, **kwargs)  # the mixed batch through fastpeft/multi_lora.py
    if kwargs or not peft_fast_path_ok(self):  # variant kwargs, DoRA, lora_bias, a mixed batch fastpeft cannot run
        return type(self).forward(self, x, *args, **kwargs)
    return lora_forward(self, x, *args)


def _adalora_forward(self, x, *args, **kwargs):
    """Instance ``forward`` of a PEFT adalora.SVDLinear: the fused LoRA op (fastpeft/adalora.py), PEFT's
    forward for what it cannot do."""
    if args or kwargs or not peft_fast_path_ok(self):
        return type(self).forward(self, x, *args, **kwargs)
    return lora_forward(self, x)


def _ia3_scale(layer):
    """The product of the active adapters' vectors of a PEFT ia3 layer, flattened ((K,) on the input,
    (N,) on the output); None when no active adapter is in this layer."""
    vectors = layer.ia3_l
    scale = None
    for name in layer.active_adapters:
        if name in vectors:
            scale = vectors[name].flatten() if scale is None else scale * vectors[name].flatten()
    return scale


def ia3_forward(self, x, *args, **kwargs):
    """Instance ``forward`` of a PEFT ia3.Linear: ``functional.ia3_linear`` (fastpeft/ia3.py, or the
    reference) with every active adapter's vector multiplied into one, as PEFT does; PEFT's own forward
    for extra arguments, disabled or merged adapters, or no active adapter in this layer."""
    scale = None
    if not (args or kwargs or self.disable_adapters or self.merged):
        scale = _ia3_scale(self)
    if scale is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    weight = base.weight.T if is_conv1d(base) else base.weight
    return functional.ia3_linear(x, weight, base.bias, scale, self.is_feedforward, options.of(self).backend)


def _mixed_ok(layer, adapter_names) -> bool:
    """Whether fastpeft computes PEFT's mixed batch on this layer: plain LoRA for every adapter named.
    Worked out once per layer for the names of a ``mixed_batch`` block (its ``checked`` table)."""
    checked = getattr(adapter_names, "checked", None)
    if checked is None:
        return _mixed_ok_now(layer, adapter_names)
    ok = checked.get(layer)
    if ok is None:
        ok = checked[layer] = _mixed_ok_now(layer, adapter_names)
    return ok


def _mixed_ok_now(layer, adapter_names) -> bool:
    variants = getattr(layer, "lora_variant", {}) or {}
    for name in set(adapter_names):
        if name in layer.lora_A and (name in variants or layer.lora_B[name].bias is not None
                                     or getattr(layer, "use_dora", {}).get(name, False)):
            return False
    return True


def _float_linear_reason(layer) -> Optional[str]:
    """Why the base of an AdaLoRA / (IA)³ layer is not one fastpeft computes (a float nn.Linear with
    nn.Linear's forward, or a transformers Conv1D), or None."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    if base is not layer.base_layer:
        return "nested base layer"
    weight = getattr(base, "weight", None)
    if not (is_conv1d(base) or (isinstance(base, nn.Linear) and models.has_linear_forward(type(base)))):
        return f"base layer {type(base).__name__}"
    if type(weight) not in (torch.Tensor, nn.Parameter) or not weight.dtype.is_floating_point:
        return f"base weight {type(weight).__name__} {getattr(weight, 'dtype', '')}".rstrip()
    return None


def _why_not_accelerated(layer) -> Optional[str]:
    """Why fastpeft leaves PEFT's forward on ``layer``, or None when fastpeft can compute it."""
    cls = type(layer)
    key = (cls.__module__, cls.__name__)
    if key in _PEFT_ADALORA_CLASSES or key in _PEFT_IA3_CLASSES:
        return _float_linear_reason(layer)
    if key not in _PEFT_LINEAR_CLASSES:
        return f"{cls.__module__}.{cls.__name__}"
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    try:
        check_wrappable("", base)
    except (TypeError, NotImplementedError):
        return f"base layer {type(base).__name__}"
    if base is not layer.base_layer:
        return "nested base layer"
    variants = [type(v).__name__ for v in (getattr(layer, "lora_variant", {}) or {}).values()]
    if any(v not in SUPPORTED_VARIANTS for v in variants):
        return "LoRA variant (" + ", ".join(variants) + ")"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias"
    return None


def _forward_for(layer):
    """The instance forward fastpeft gives a PEFT layer of the classes above."""
    cls = type(layer)
    key = (cls.__module__, cls.__name__)
    if key in _PEFT_ADALORA_CLASSES:
        return _adalora_forward
    if key in _PEFT_IA3_CLASSES:
        return ia3_forward
    return _accelerated_forward


def peft_type_of(config) -> Optional[str]:
    """A PEFT config's peft_type as a str ("LORA", "IA3", ...)."""
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", peft_type)


def patch_peft_model(peft_model, options: Optional[Options] = None):
    """Give every PEFT LoRA, AdaLoRA and (IA)³ layer of ``peft_model`` that fastpeft supports fastpeft's
    forward, in place; all or nothing. ``options``: the model's (see ``model_state.install_fused_forwards``).
    A PEFT method other than those and the prompt-based ones raises ValueError, changing nothing."""
    configs = getattr(peft_model, "peft_config", {}) or {}
    prompt_based = []
    for name, cfg in configs.items():
        peft_type = peft_type_of(cfg)
        if peft_type in PROMPT_BASED:
            prompt_based.append(f"{name} ({peft_type})")
        elif peft_type not in ACCELERATED_TYPES:
            raise ValueError(f"fastpeft accelerates LoRA, AdaLoRA and IA3 adapters (and leaves prompt-based ones to "
                             f"PEFT); adapter {name!r} is {peft_type}, which fastpeft does not support")
    if prompt_based:
        warnings.warn(f"fastpeft.patch: {', '.join(prompt_based)} left to PEFT's own code (prompt-based methods have "
                      f"no linear layer to fuse)")
        if not any(is_peft_adapter_layer(m) for m in peft_model.modules()):
            return peft_model
    skipped, todo, accelerated = [], [], 0
    for name, layer in peft_model.named_modules():
        if not is_peft_adapter_layer(layer):
            continue
        if layer.__dict__.get(ACCELERATED_ATTR, False):
            accelerated += 1
            continue
        reason = _why_not_accelerated(layer)
        if reason is not None:
            skipped.append(f"{name} ({reason})")
        else:
            todo.append(layer)
    if not accelerated and not todo and not skipped:
        raise ValueError(f"fastpeft.patch: {type(peft_model).__name__} has no PEFT LoRA, AdaLoRA or IA3 layers to "
                         f"accelerate")
    if skipped:
        warnings.warn(
            f"fastpeft.patch: {len(skipped)} PEFT adapter layer(s) keep PEFT's forward (not supported by fastpeft): "
            + shorten_names(skipped, limit=20)
        )
    with contextlib.ExitStack() as undo:  # as in patch.apply_plan: an error undoes every change
        for layer in todo:
            undo.callback(_restore_peft_forward, layer)
            layer.forward = types.MethodType(_forward_for(layer), layer)
            setattr(layer, ACCELERATED_ATTR, True)
        install_fused_forwards(undo, peft_model, options)
        setattr(peft_model, PEFT_PATCHED_ATTR, True)
        undo.pop_all()
    return peft_model


def _restore_peft_forward(layer) -> None:
    if layer.__dict__.pop(ACCELERATED_ATTR, False):
        layer.__dict__.pop("forward", None)


def unpatch_peft_model(peft_model) -> None:
    """PEFT's own forwards back on every layer of ``peft_model``; its adapters stay as they are."""
    uninstall_fused_forwards(peft_model)
    for _, layer in peft_model.named_modules():
        _restore_peft_forward(layer)
    peft_model.__dict__.pop(PEFT_PATCHED_ATTR, None)

