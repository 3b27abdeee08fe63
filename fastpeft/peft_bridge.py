"""``patch(peft_model)``: a ``peft.PeftModel`` keeps PEFT's modules, parameters and names, and each
``lora.Linear`` (and QLoRA ``lora.bnb.Linear4bit``) that fastpeft supports gets fastpeft's compute as an instance-level ``forward``, so
``save_pretrained``, ``merge_and_unload`` and ``transformers.Trainer`` keep working. Layers fastpeft does
not support (other layer types, 8-bit or nested bases, variants other than DoRA, lora_bias) keep
PEFT's forward, with one warning naming them; a call fastpeft cannot compute exactly (several active
adapters with a DoRA one among them) goes to PEFT's forward. Prompt-based adapters (prompt / prefix / P-tuning,
LLaMA-Adapter) have no linear layer to fuse: they are left to PEFT's code with one notice. Mixed-adapter batches (``adapter_names=``, which PEFT's
hooks hand to each layer) run through fastpeft/multi_lora.py where every named adapter is plain LoRA;
variant kwargs go through PEFT's forward. ``unpatch`` gives every layer PEFT's forward back.
"""
from __future__ import annotations

import contextlib
import types
import warnings
from typing import Optional

from .layer import ACCELERATED_ATTR, SUPPORTED_VARIANTS, lora_forward, peft_fast_path_ok
from .model_state import PEFT_PATCHED_ATTR, install_fused_forwards, is_peft_lora_layer, uninstall_fused_forwards
from .options import Options
from .targets import check_wrappable, shorten_names


# PEFT's prompt-based methods: no linear layer to fuse; patch(peft_model) leaves them to PEFT's code
PROMPT_BASED = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT"}

# PEFT's LoRA layer classes whose forward fastpeft computes: over a float linear, and over a
# bitsandbytes 4-bit linear (QLoRA, fastpeft/qlora.py)
_PEFT_LINEAR_CLASSES = {("peft.tuners.lora.layer", "Linear"), ("peft.tuners.lora.bnb", "Linear4bit")}


def _accelerated_forward(self, x, *args, **kwargs):
    """Instance ``forward`` of a PEFT lora.Linear: fastpeft's compute, PEFT's for what it cannot do."""
    if set(kwargs) == {"adapter_names"} and kwargs["adapter_names"] is not None and _mixed_ok(self, kwargs["adapter_names"]):
        return lora_forward(self, x, *args, **kwargs)  # the mixed batch through fastpeft/multi_lora.py
    if kwargs or not peft_fast_path_ok(self):  # variant kwargs, DoRA, lora_bias, a mixed batch fastpeft cannot run
        return type(self).forward(self, x, *args, **kwargs)
    return lora_forward(self, x, *args)


def _mixed_ok(layer, adapter_names) -> bool:
    """Whether fastpeft computes PEFT's mixed batch on this layer: plain LoRA for every adapter named."""
    variants = getattr(layer, "lora_variant", {}) or {}
    for name in set(adapter_names):
        if name in layer.lora_A and (name in variants or layer.lora_B[name].bias is not None
                                     or getattr(layer, "use_dora", {}).get(name, False)):
            return False
    return True


def _why_not_accelerated(layer) -> Optional[str]:
    """Why fastpeft leaves PEFT's forward on ``layer``, or None when fastpeft can compute it."""
    cls = type(layer)
    if (cls.__module__, cls.__name__) not in _PEFT_LINEAR_CLASSES:
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


def patch_peft_model(peft_model, options: Optional[Options] = None):
    """Give every PEFT LoRA layer of ``peft_model`` that fastpeft supports fastpeft's forward, in place; all or
    nothing. ``options``: the model's (see ``model_state.install_fused_forwards``)."""
    configs = getattr(peft_model, "peft_config", {}) or {}
    prompt_based = []
    for name, cfg in configs.items():
        peft_type = getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", None))
        if peft_type in PROMPT_BASED:
            prompt_based.append(f"{name} ({peft_type})")
        elif peft_type != "LORA":
            raise ValueError(f"fastpeft accelerates LoRA adapters only; adapter {name!r} is {peft_type}")
    if prompt_based:
        warnings.warn(f"fastpeft.patch: {', '.join(prompt_based)} left to PEFT's own code (prompt-based methods have "
                      f"no linear layer to fuse)")
        if not any(is_peft_lora_layer(m) for m in peft_model.modules()):
            return peft_model
    skipped, todo, accelerated = [], [], 0
    for name, layer in peft_model.named_modules():
        if not is_peft_lora_layer(layer):
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
        raise ValueError(f"fastpeft.patch: {type(peft_model).__name__} has no PEFT LoRA layers to accelerate")
    if skipped:
        warnings.warn(
            f"fastpeft.patch: {len(skipped)} PEFT LoRA layer(s) keep PEFT's forward (not supported by fastpeft): "
            + shorten_names(skipped, limit=20)
        )
    with contextlib.ExitStack() as undo:  # as in patch.apply_plan: an error undoes every change
        for layer in todo:
            undo.callback(_restore_peft_forward, layer)
            layer.forward = types.MethodType(_accelerated_forward, layer)
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

