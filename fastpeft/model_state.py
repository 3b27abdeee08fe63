"""What fastpeft keeps on a model it patched, and how the rest of fastpeft reads it back.

A plain patched model carries ``model.fastpeft_config`` ({adapter name: LoraConfig}) and the
modules_to_save of each adapter; a patched ``peft.PeftModel`` carries a mark. Both get the fused MLP
and q/k/v group forwards (fastpeft/mlp.py, fastpeft/group.py) and the model's options, installed
here with their undo.
PEFT's models and LoRA / AdaLoRA / (IA)³ layers are recognised without importing peft.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch.nn as nn

from . import group, mlp
from .layer import GROUP_ATTR, LoraLinear
from .options import OPTIONS_ATTR, Options

CONFIG_ATTR = "fastpeft_config"  # model.fastpeft_config = {adapter_name: LoraConfig}
MODULES_TO_SAVE_ATTR = "_fastpeft_modules_to_save"  # {adapter_name: [module names]}
PEFT_PATCHED_ATTR = "_fastpeft_patched_peft"  # set on a PeftModel by patch(peft_model)


def check_model(model, what: str) -> None:
    """TypeError unless ``model`` is an nn.Module; ``what`` names the function called."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{what} expects a torch.nn.Module (a transformers model or a peft.PeftModel), got {type(model).__name__}"
        )


def is_peft_model(model) -> bool:
    """True for a ``peft.PeftModel`` (or its ``LoraModel`` tuner), detected without importing peft."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("peft.") and cls.__name__ in ("PeftModel", "BaseTuner", "PeftMixedModel"):
            return True
    return False


def is_peft_lora_layer(module) -> bool:
    """A PEFT LoRA layer (``peft.tuners.lora.*``): it has PEFT's lora_A / base_layer attributes."""
    return (
        type(module).__module__.startswith("peft.tuners.lora")
        and hasattr(module, "lora_A")
        and hasattr(module, "base_layer")
    )


def is_peft_adalora_layer(module) -> bool:
    """A PEFT AdaLoRA layer (``peft.tuners.adalora.*``: lora_A, lora_E and lora_B beside a base_layer)."""
    return (
        type(module).__module__.startswith("peft.tuners.adalora")
        and hasattr(module, "lora_E")
        and hasattr(module, "base_layer")
    )


def is_peft_ia3_layer(module) -> bool:
    """A PEFT (IA)³ layer (``peft.tuners.ia3.*``: ia3_l beside a base_layer)."""
    return (
        type(module).__module__.startswith("peft.tuners.ia3")
        and hasattr(module, "ia3_l")
        and hasattr(module, "base_layer")
    )


def is_peft_adapter_layer(module) -> bool:
    """A PEFT layer of a method ``patch(peft_model)`` accelerates: LoRA, AdaLoRA or (IA)³."""
    return is_peft_lora_layer(module) or is_peft_adalora_layer(module) or is_peft_ia3_layer(module)


def adapter_configs(model: nn.Module) -> dict:
    """{adapter name: LoraConfig} of a fastpeft-patched model (empty when it is not patched)."""
    return getattr(model, CONFIG_ATTR, None) or {}


def modules_to_save(model: nn.Module) -> dict[str, list[str]]:
    """{adapter name: names of the modules it trains in full} of a fastpeft-patched model."""
    return getattr(model, MODULES_TO_SAVE_ATTR, None) or {}


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every fastpeft ``LoraLinear`` and PEFT LoRA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear) or is_peft_lora_layer(m)]


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every LoRA layer (``lora_layers``) and PEFT AdaLoRA / (IA)³ layer in ``model``:
    what ``merge`` / ``unmerge`` reach (each has PEFT's ``merge``, ``unmerge`` and ``merged``)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear) or is_peft_adapter_layer(m)]


def fastpeft_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """(name, layer) of every fastpeft ``LoraLinear`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters of a fastpeft-patched model (those of its LoRA layers)."""
    for _, layer in fastpeft_layers(model):
        return layer.active_adapters
    return []


MISSING = object()


def restore_entry(d: dict, key, old) -> None:
    """Put ``d[key]`` back to ``old`` (``MISSING``: remove it)."""
    if old is MISSING:
        d.pop(key, None)
    else:
        d[key] = old


def install_fused_forwards(undo: contextlib.ExitStack, model: nn.Module, options: Optional[Options] = None) -> None:
    """Install the fused MLP and q/k/v group forwards on ``model``, and give the model, its LoRA layers
    (PEFT's too, and PEFT's AdaLoRA and (IA)³ layers) and fused MLPs the model's options: ``options``, else those it already has (layers
    added later, by another patch or load_adapter, get them too), else none (the process's apply).
    ``undo`` takes all of it off again, where it was not there before, if it unwinds on an error."""
    for part, marker in ((mlp, mlp.FUSED_MLP_ATTR), (group, GROUP_ATTR)):
        undo.callback(part.uninstall, [m for m in model.modules() if marker not in m.__dict__])
        part.install(model)
    options = options or model.__dict__.get(OPTIONS_ATTR)
    if options is None:
        return
    for module in model.modules():
        if module is model or isinstance(module, LoraLinear) or is_peft_adapter_layer(module) \
                or mlp.FUSED_MLP_ATTR in module.__dict__:
            undo.callback(restore_entry, module.__dict__, OPTIONS_ATTR, module.__dict__.get(OPTIONS_ATTR, MISSING))
            module.__dict__[OPTIONS_ATTR] = options


def uninstall_fused_forwards(model: nn.Module) -> None:
    """Take the fused MLP and q/k/v group forwards and the model's options off every module of ``model``."""
    mlp.uninstall(model.modules())
    group.uninstall(model.modules())
    for module in model.modules():
        module.__dict__.pop(OPTIONS_ATTR, None)
