"""PEFT's checkpoint key layout, written once: ``peft_state_dict`` gives the tensors of one adapter of a
fastpeft-patched model under the keys ``peft_model.save_pretrained`` writes (``peft/utils/save_and_load.py``).

A key is the PeftModel state-dict name without the adapter name, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (r x in) and ``...lora_B.weight``
(out x r), DoRA's magnitude as ``...lora_magnitude_vector`` (out,); modules_to_save as ``base_model.model.<module>.<param>``; with ``bias="lora_only"`` each
wrapped layer's ``...<module>.base_layer.bias``, with ``bias="all"`` every ``*.bias`` of the model.
``save_adapter`` writes this mapping; ``load_adapter`` checks a file against it and copies each tensor
into the one under its key.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import LoraConfig
from .model_state import adapter_configs, fastpeft_layers, modules_to_save

PREFIX = "base_model.model."


def _learnable_biases(model: nn.Module, config: LoraConfig) -> dict[str, nn.Parameter]:
    """{state-dict name: tensor} of the base biases saved with the adapter (PEFT's _get_learnable_bias_state_dict)."""
    if config.bias == "all":
        sd = model.state_dict(keep_vars=True)
        return {k: v for k, v in sd.items() if (k == "bias" or k.endswith(".bias")) and ".lora_" not in k}
    if config.bias == "lora_only":
        return {
            f"{name}.base_layer.bias": layer.base_layer.bias
            for name, layer in fastpeft_layers(model)
            if layer.base_layer.bias is not None
        }
    return {}


def peft_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """{PEFT checkpoint key: live tensor} of adapter ``adapter_name`` of a fastpeft-patched model: what
    ``save_adapter`` writes and where ``load_adapter`` copies each tensor of a file (PEFT's
    ``get_peft_model_state_dict``)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"model has no fastpeft adapter {adapter_name!r}; it has {sorted(configs) or 'none'}")
    out: dict[str, torch.Tensor] = {}
    for name, layer in fastpeft_layers(model):
        if adapter_name in layer.lora_A:
            out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
            if adapter_name in layer.lora_magnitude_vector:  # DoRA
                out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
    for module_name in modules_to_save(model).get(adapter_name, []):
        sd = model.get_submodule(module_name).state_dict(keep_vars=True)
        out.update({f"{PREFIX}{module_name}.{k}": v for k, v in sd.items()})
    for k, v in _learnable_biases(model, configs[adapter_name]).items():
        out.setdefault(PREFIX + k, v)
    return out


def is_wrapper_copy_key(model: nn.Module, adapter_name: str, key: str) -> bool:
    """A key PEFT writes that fastpeft has no tensor for: with bias="all" PEFT also saves the biases of its
    ModulesToSaveWrapper internals (``<module>.original_module.bias``, ``<module>.modules_to_save.bias``);
    fastpeft trains the module itself, without such copies."""
    if adapter_configs(model)[adapter_name].bias != "all":
        return False
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return any(
        body.startswith(f"{m}.original_module.") or body.startswith(f"{m}.modules_to_save.")
        for m in modules_to_save(model).get(adapter_name, [])
    )
