"""``patch`` / ``unpatch``: put fastpeft's LoRA layers into a Hugging Face model, and take them out.

Two entry points share one name:

- ``patch(model, LoraConfig(...))`` on a plain (transformers) model swaps each targeted ``nn.Linear`` /
  ``Conv1D`` for a :class:`fastpeft.LoraLinear`, in place, matching modules exactly as PEFT does
  (fastpeft/targets.py), and freezes everything but the adapters, ``modules_to_save`` and the biases
  asked for.
- ``patch(peft_model)`` on a ``peft.PeftModel`` keeps PEFT's modules, parameters and names and only
  swaps the compute of each ``lora.Linear`` (and AdaLoRA ``SVDLinear``, (IA)³ ``ia3.Linear``) for
  fastpeft's (fastpeft/peft_bridge.py).

Either way the GLU MLPs whose three projections carry LoRA get the fused MLP forward (fastpeft/mlp.py).
PEFT's mixed-adapter batches (``adapter_names=``, one adapter per row) run on a patched model's
``forward`` and ``generate`` through fastpeft/multi_lora.py, and on a patched PeftModel too.

Everything is checked before anything is changed (``targets.plan_patch``, then ``apply_plan``), and a
failure while changing it undoes what was done: an error leaves the model as it was.
"""
from __future__ import annotations

import contextlib
import types
import warnings
from typing import Optional

import torch
import torch.nn as nn

from .layer import LoraLinear, adapter_parameters
from .multi_lora import mixed_batch
from .model_state import (
    CONFIG_ATTR,
    MISSING,
    MODULES_TO_SAVE_ATTR,
    PEFT_PATCHED_ATTR,
    active_adapters,
    adapter_configs,
    adapter_layers,
    check_model,
    fastpeft_layers,
    install_fused_forwards,
    is_peft_adapter_layer,
    is_peft_model,
    modules_to_save,
    restore_entry,
    uninstall_fused_forwards,
)
from .options import Options
from .peft_bridge import patch_peft_model, unpatch_peft_model
from .targets import PatchPlan, plan_patch

_ADAPTER_NAMES_HOOK_ATTR = "_fastpeft_adapter_names_hook"  # on a patched model: its forward pre-hook's handle


def _get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


# --- applying a plan --------------------------------------------------------------------------
def _adapter_dtype(weight: torch.Tensor, autocast_adapter_dtype: bool) -> torch.dtype:
    """PEFT: fp32 adapters over a fp16/bf16 base with autocast_adapter_dtype, else the base dtype."""
    if autocast_adapter_dtype and weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


def _restore_flags(flags) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


@contextlib.contextmanager
def plan_applied(model: nn.Module, plan: PatchPlan, autocast_adapter_dtype: bool = True,
                 options: Optional[Options] = None):
    """Apply ``plan`` (from :func:`fastpeft.targets.plan_patch`) to ``model`` for a ``with`` block: an error
    while applying it, or one raised in the block, undoes every change; the block ending keeps them
    (load_adapter checks a file against the patched model inside one)."""
    config, name = plan.config, plan.adapter_name
    was_patched = bool(adapter_configs(model))
    current_active = active_adapters(model) if was_patched else [name]
    previous_flags = [(p, p.requires_grad) for p in model.parameters()]
    with contextlib.ExitStack() as undo:  # each change registers its undo; an error runs them, last first
        undo.callback(_restore_flags, previous_flags)
        for t in plan.targets:
            if isinstance(t.module, LoraLinear):
                if name not in t.module.lora_A:  # (update_layer refuses an existing name, changing nothing)
                    undo.callback(t.module.drop_adapter, name)
                t.module.update_layer(
                    name, t.r, t.alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights,
                    _adapter_dtype(t.module.base_layer.weight, autocast_adapter_dtype), config.use_dora,
                )
            else:
                layer = LoraLinear(
                    t.module, name, t.r, t.alpha, config.lora_dropout, t.fan_in_fan_out, config.use_rslora,
                    config.init_lora_weights, _adapter_dtype(t.module.weight, autocast_adapter_dtype),
                    use_dora=config.use_dora,
                )
                layer._active_adapter = list(current_active)
                parent, child = _get_submodule_parent(model, t.name)
                setattr(parent, child, layer)
                undo.callback(setattr, parent, child, t.module)
        for attr in (CONFIG_ATTR, MODULES_TO_SAVE_ATTR):
            undo.callback(restore_entry, model.__dict__, attr, model.__dict__.get(attr, MISSING))
        configs = dict(adapter_configs(model))
        configs[name] = config
        setattr(model, CONFIG_ATTR, configs)
        saved = dict(modules_to_save(model))
        saved[name] = list(plan.modules_to_save)
        setattr(model, MODULES_TO_SAVE_ATTR, saved)

        install_fused_forwards(undo, model, options)
        _guard_adapter_names(undo, model)
        if not was_patched:
            mark_trainable(model)
        else:  # adding an adapter leaves the trainability of everything else as it was (PEFT's add_adapter)
            _restore_flags(previous_flags)
            for _, layer in fastpeft_layers(model):
                if name in layer.lora_A:
                    trainable = name in layer.active_adapters and not config.inference_mode
                    layer.lora_A[name].weight.requires_grad_(trainable)
                    layer.lora_B[name].weight.requires_grad_(trainable)
        yield model
        undo.pop_all()  # success: keep every change


def apply_plan(model: nn.Module, plan: PatchPlan, autocast_adapter_dtype: bool = True,
               options: Optional[Options] = None) -> nn.Module:
    """Apply ``plan`` (from :func:`fastpeft.targets.plan_patch`) to ``model``: all of it, or on any error none of it."""
    with plan_applied(model, plan, autocast_adapter_dtype, options):
        return model


# --- mixed-adapter batches (PEFT's adapter_names=) ----------------------------------------------
_MIXED_ATTR = "_fastpeft_mixed_batches"  # on a patched model: the mixed_batch contexts its running forwards entered


def _adapter_names_pre_hook(model, args, kwargs):
    """Forward pre-hook of a patched model: ``model(..., adapter_names=[...])`` (which transformers would
    swallow in ``**kwargs``) hands the names to every LoRA layer for this forward (``multi_lora.mixed_batch``,
    left by the forward hook below). ``adapter_names=None`` (no mixed batch) is taken out, as PEFT does."""
    if "adapter_names" not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    if names is not None:
        context = mixed_batch(model, names)
        context.__enter__()
        model.__dict__.setdefault(_MIXED_ATTR, []).append(context)
    return args, kwargs


def _adapter_names_post_hook(model, args, kwargs, output):
    contexts = model.__dict__.get(_MIXED_ATTR)
    if contexts:
        contexts.pop().__exit__(None, None, None)


def _generate(self, *args, **kwargs):
    """Instance ``generate`` of a patched model: ``adapter_names`` hold for every forward of the
    generation (each repeated ``num_beams`` times, as PEFT does)."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return type(self).generate(self, *args, **kwargs)
    with mixed_batch(self, names, kwargs.get("num_beams")):
        return type(self).generate(self, *args, **kwargs)


def _guard_adapter_names(undo: contextlib.ExitStack, model: nn.Module) -> None:
    """Install the hooks and the ``generate`` above on ``model`` (once), undone by ``undo`` on an error."""
    if _ADAPTER_NAMES_HOOK_ATTR in model.__dict__:
        return
    undo.callback(_unguard_adapter_names, model)
    model.__dict__[_ADAPTER_NAMES_HOOK_ATTR] = (
        model.register_forward_pre_hook(_adapter_names_pre_hook, with_kwargs=True),
        model.register_forward_hook(_adapter_names_post_hook, with_kwargs=True, always_call=True))
    if "generate" not in model.__dict__ and callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(_generate, model)


def _unguard_adapter_names(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_ADAPTER_NAMES_HOOK_ATTR, ()):
        handle.remove()
    if getattr(model.__dict__.get("generate"), "__func__", None) is _generate:
        del model.__dict__["generate"]


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything except the active adapters, their modules_to_save and the biases they ask for."""
    configs = adapter_configs(model)
    active = set(active_adapters(model))
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in fastpeft_layers(model):
        for adapter in layer.lora_A.keys():
            trainable = adapter in active and not configs[adapter].inference_mode
            for p in adapter_parameters(layer, adapter):
                p.requires_grad_(trainable)
    saved = modules_to_save(model)
    for adapter in active:
        config = configs.get(adapter)
        if config is None or config.inference_mode:
            continue
        for module_name in saved.get(adapter, []):
            for p in model.get_submodule(module_name).parameters():
                p.requires_grad_(True)
        if config.bias == "all":
            for n, p in model.named_parameters():
                if n == "bias" or n.endswith(".bias"):
                    p.requires_grad_(True)
        elif config.bias == "lora_only":
            for _, layer in fastpeft_layers(model):
                if layer.base_layer.bias is not None:
                    layer.base_layer.bias.requires_grad_(True)


def set_adapter(model: nn.Module, adapter_names) -> None:
    """Make ``adapter_names`` (str or list) the active adapters of a fastpeft-patched model (PEFT's set_adapter)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    configs = adapter_configs(model)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(configs)}")
    for _, layer in fastpeft_layers(model):
        layer._active_adapter = list(names)
    mark_trainable(model)


def patch(model: nn.Module, lora_config=None, adapter_name: str = "default", autocast_adapter_dtype: bool = True,
          options: Optional[Options] = None):
    """Add LoRA adapter ``adapter_name`` to ``model`` in place and return it.

    ``options``: a :class:`fastpeft.Options` (backend, fused MLP, grouped q/k/v) for this model; None
    keeps the model's earlier ones, else it follows the process's (``fastpeft.set_options``).

    ``lora_config``: a :class:`fastpeft.LoraConfig`, a ``peft.LoraConfig`` or a dict of its fields;
    required, as PEFT's ``get_peft_model`` requires one (``fastpeft.LoraConfig()`` for PEFT's defaults).
    Patching an already patched model under a new name adds that adapter (to the layers it already
    wraps and to newly targeted ones), inactive, as PEFT's ``add_adapter`` does; see
    :func:`set_adapter`. A ``peft.PeftModel`` is accelerated in place instead (no config allowed).
    """
    check_model(model, "fastpeft.patch")
    if options is not None and not isinstance(options, Options):
        raise TypeError(f"options must be a fastpeft.Options, got {type(options).__name__}")
    # A PeftModel, or a transformers model with PEFT layers injected (model.add_adapter / load_adapter).
    has_peft_layers = is_peft_model(model) or any(is_peft_adapter_layer(m) for m in model.modules())
    if has_peft_layers:
        if lora_config is not None:
            raise ValueError(
                "fastpeft.patch(peft_model) takes no lora_config: the PEFT model already has its adapters "
                "(add more with peft_model.add_adapter)"
            )
        return patch_peft_model(model, options)
    if lora_config is None:
        raise TypeError(
            f"fastpeft.patch needs a lora_config for {type(model).__name__}, which has no PEFT adapters, e.g. "
            f"fastpeft.LoraConfig(r=16, target_modules='all-linear') (fastpeft.LoraConfig() for PEFT's defaults); "
            f"only a peft.PeftModel is patched without one"
        )
    plan = plan_patch(model, lora_config, adapter_name)
    return apply_plan(model, plan, autocast_adapter_dtype, options)


# --- undo / merge -----------------------------------------------------------------------------
def unpatch(model: nn.Module, merge: bool = True) -> nn.Module:
    """Take fastpeft out of ``model`` in place and return it.

    Plain model: each LoraLinear becomes its base layer again, with the active adapters merged into it
    when ``merge`` (PEFT's ``merge_and_unload``), or with the base weights as they were (adapters
    unmerged first if they had been merged) otherwise. modules_to_save keep their trained weights (as
    PEFT's unload does). The stored config is dropped. PEFT model: PEFT's own forwards come back
    (nothing is merged; use ``peft_model.merge_and_unload()`` for that).
    """
    check_model(model, "fastpeft.unpatch")
    if getattr(model, PEFT_PATCHED_ATTR, False) or is_peft_model(model):
        unpatch_peft_model(model)  # PEFT's forwards come back; PEFT's layers stay
        return model
    layers = fastpeft_layers(model)
    if not layers and not adapter_configs(model):
        raise ValueError(f"{type(model).__name__} is not patched by fastpeft: nothing to unpatch")
    uninstall_fused_forwards(model)
    _unguard_adapter_names(model)
    for name, layer in layers:
        if merge:
            todo = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
            if todo:
                layer.merge(adapter_names=todo)
        elif layer.merged:
            layer.unmerge()
        parent, child = _get_submodule_parent(model, name)
        setattr(parent, child, layer.base_layer)
    model.__dict__.pop(CONFIG_ATTR, None)
    model.__dict__.pop(MODULES_TO_SAVE_ATTR, None)
    return model


def merge(model: nn.Module, safe_merge: bool = False, adapter_names=None) -> None:
    """Merge the active adapters (or ``adapter_names``) into the base weights of every LoRA layer (and
    PEFT AdaLoRA / (IA)³ layer, by PEFT's own merge)."""
    check_model(model, "fastpeft.merge")
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge (nor PEFT AdaLoRA or IA3 layers)")
    for _, layer in layers:
        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)


def unmerge(model: nn.Module) -> None:
    """Take the merged adapters out of the base weights of every LoRA layer (and PEFT AdaLoRA / (IA)³
    layer)."""
    check_model(model, "fastpeft.unmerge")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to unmerge (nor PEFT AdaLoRA or IA3 layers)")
    merged = [layer for _, layer in layers if layer.merged]
    if not merged:
        warnings.warn("Already unmerged. Nothing to do.")
    for layer in merged:
        layer.unmerge()
