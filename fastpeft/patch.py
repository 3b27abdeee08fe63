"""``patch`` / ``unpatch``: put fastpeft's LoRA layers into a Hugging Face model, and take them out.

Two entry points share one name:

- ``patch(model, LoraConfig(...))`` on a plain (transformers) model swaps each targeted ``nn.Linear`` /
  ``Conv1D`` for a :class:`fastpeft.LoraLinear`, in place, matching modules exactly as PEFT does
  (``check_target_module_exists``), and freezes everything but the adapters, ``modules_to_save`` and
  the biases asked for.
- ``patch(peft_model)`` on a ``peft.PeftModel`` keeps PEFT's modules, parameters and names and only
  swaps the compute of each ``lora.Linear`` for fastpeft's (an instance-level ``forward``), so
  ``save_pretrained``, ``merge_and_unload`` and ``transformers.Trainer`` keep working.

Either way the GLU MLPs whose three projections carry LoRA get the fused MLP forward (fastpeft/mlp.py).
PEFT's mixed-adapter batches (``adapter_names=``): a PeftModel runs them through PEFT; a plain patched
model raises ``NotImplementedError`` from its ``forward`` and ``generate`` until multi-LoRA lands.

Everything is checked before anything is changed (``plan_patch``, then ``apply_plan``), and a failure
while changing it undoes what was done: an error leaves the model as it was.
"""
from __future__ import annotations

import contextlib
import re
import types
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from . import models
from .config import INCLUDE_LINEAR_LAYERS_SHORTHAND, LoraConfig
from . import group, mlp
from .options import OPTIONS_ATTR, Options
from .layer import (
    ACCELERATED_ATTR,
    GROUP_ATTR,
    LoraLinear,
    is_conv1d,
    lora_forward,
    peft_fast_path_ok,
    reject_adapter_names,
)

CONFIG_ATTR = "fastpeft_config"  # model.fastpeft_config = {adapter_name: LoraConfig}
_MODULES_TO_SAVE_ATTR = "_fastpeft_modules_to_save"  # {adapter_name: [module names]}
_PEFT_PATCHED_ATTR = "_fastpeft_patched_peft"  # set on a PeftModel by patch(peft_model)
_ADAPTER_NAMES_HOOK_ATTR = "_fastpeft_adapter_names_hook"  # on a patched model: its forward pre-hook's handle
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20  # PEFT condenses longer target lists into suffixes


# --- model inspection -------------------------------------------------------------------------
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


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every fastpeft ``LoraLinear`` and PEFT LoRA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear) or is_peft_lora_layer(m)]


def _fastpeft_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters of a fastpeft-patched model (those of its LoRA layers)."""
    for _, layer in _fastpeft_layers(model):
        return layer.active_adapters
    return []


def _shorten_names(names: list[str], limit: int = 40) -> str:
    """Layer names with the numeric path segments collapsed (``model.layers.*.mlp.up_proj``), deduplicated."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name), None)
    short = list(seen)
    text = ", ".join(short[:limit])
    if len(short) > limit:
        text += f", ... ({len(short) - limit} more)"
    return text or "(none)"


def _linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear / Conv1D / LoraLinear layers, not counting the insides of a LoraLinear."""
    classes = models.linear_classes() + (LoraLinear,)
    names, inside = [], []
    for n, m in model.named_modules():
        if not n or any(n.startswith(p) for p in inside):
            continue
        if isinstance(m, LoraLinear):
            inside.append(n + ".")
        if isinstance(m, classes):
            names.append(n)
    return names


def _get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


# --- target matching (PEFT's check_target_module_exists) ----------------------------------------
class _Excluded:
    """A non-match that was excluded (exclude_modules / modules_to_save) rather than unmatched."""

    def __bool__(self):
        return False


def _match_str(pattern: str, key: str) -> bool:
    return re.fullmatch(pattern, key) is not None


def target_module_matches(config: LoraConfig, key: str):
    """PEFT's ``check_target_module_exists`` for a resolved (non-None) ``config.target_modules``."""
    if config.exclude_modules:
        if isinstance(config.exclude_modules, str):
            if _match_str(config.exclude_modules, key):
                return _Excluded()
        elif key in config.exclude_modules or any(key.endswith(f".{e}") for e in config.exclude_modules):
            return _Excluded()
    if config.modules_to_save:
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
            return _Excluded()
    targets = config.target_modules
    if isinstance(targets, str):
        return _match_str(targets, key)
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    indexes, pattern = config.layers_to_transform, config.layers_pattern
    using_indexes = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if using_indexes and found:
        match = None
        if pattern is None or len(pattern) == 0:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == indexes if isinstance(indexes, int) else idx in indexes
    return found


def find_minimal_target_modules(target_modules, other_module_names) -> set[str]:
    """PEFT's ``_find_minimal_target_modules``: the fewest suffixes that pick exactly the targets."""
    target_modules, other = set(target_modules), set(other_module_names)

    def suffixes(s):
        parts = s.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {suf for item in other for suf in suffixes(item)}
    required: set[str] = set()
    for item, sufs in sorted({t: suffixes(t) for t in target_modules}.items(), key=lambda kv: kv[1]):
        for suf in sufs:
            if suf in required or suf in other_suffixes:
                continue
            if not any(item.endswith("." + req) for req in required):
                required.add(suf)
                break
    return required or target_modules


# --- which modules fastpeft can wrap ------------------------------------------------------------
# Module types PEFT's LoRA handles but fastpeft does not (yet): NotImplementedError rather than TypeError.
_PEFT_ONLY_TYPES = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def check_wrappable(name: str, module: nn.Module) -> None:
    """Raise unless fastpeft's LoraLinear can wrap ``module``: a float nn.Linear (or a subclass computing
    nn.Linear's forward, models.has_linear_forward) or a transformers Conv1D."""
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    if isinstance(module, LoraLinear) or is_conv1d(module):
        return
    if is_peft_lora_layer(module):
        raise TypeError(
            f"fastpeft cannot apply LoRA to {name!r}: it is already a PEFT LoRA layer ({cls}); call "
            f"fastpeft.patch(model) without a config to accelerate the PEFT adapters instead"
        )
    if isinstance(module, nn.Linear):
        weight_cls = type(module.weight).__name__
        if weight_cls in ("Params4bit", "Int8Params") or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            raise NotImplementedError(
                f"fastpeft cannot apply LoRA to {name!r}: it is a quantized {cls} (weight {weight_cls}); "
                f"quantized base layers are not supported by fastpeft.patch yet"
            )
        if not models.has_linear_forward(type(module)):
            raise NotImplementedError(
                f"fastpeft cannot apply LoRA to {name!r}: {cls} subclasses nn.Linear with its own forward, "
                f"which fastpeft would bypass (fastpeft.models.LINEAR_EQUIVALENT_CLASSES lists the subclasses "
                f"known to compute nn.Linear's forward)"
            )
        if not module.weight.dtype.is_floating_point:
            raise NotImplementedError(
                f"fastpeft cannot apply LoRA to {name!r}: its weight is {module.weight.dtype}, expected a float dtype"
            )
        return
    if isinstance(module, _PEFT_ONLY_TYPES):
        raise NotImplementedError(
            f"fastpeft cannot apply LoRA to {name!r}: it is a {cls}; fastpeft supports nn.Linear and "
            f"transformers Conv1D only (exclude it or narrow target_modules)"
        )
    raise TypeError(
        f"fastpeft cannot apply LoRA to {name!r}: it is a {cls}; fastpeft supports nn.Linear and transformers "
        f"Conv1D only (exclude it or narrow target_modules)"
    )


# --- planning: resolve everything, change nothing ---------------------------------------------
@dataclass
class _Target:
    name: str
    module: nn.Module
    r: int
    alpha: float
    fan_in_fan_out: bool


@dataclass
class PatchPlan:
    adapter_name: str
    config: LoraConfig
    targets: list[_Target] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


def _resolve_modules_to_save(model: nn.Module, config: LoraConfig, adapter_name: str, user_names) -> list[str]:
    """PEFT's ``_set_trainable`` matching: a module whose name ends with one of ``modules_to_save``."""
    if not config.modules_to_save:
        return []
    lora_prefixes = [n + "." for n, _ in lora_layers(model)]
    names, found = [], set()
    for key, module in model.named_modules(remove_duplicate=False):
        if not key or any(key.startswith(p) for p in lora_prefixes):
            continue
        hits = [t for t in config.modules_to_save if key.endswith(t)]
        if hits:
            if isinstance(module, LoraLinear):
                raise NotImplementedError(
                    f"modules_to_save entry {hits[0]!r} matches {key!r}, a LoRA layer of another adapter; "
                    f"fastpeft cannot train a full copy of a LoRA-wrapped layer"
                )
            names.append(key)
            found.update(hits)
    heads = models.TASK_MODULES_TO_SAVE.get(config.task_type, [])
    missing = [t for t in (user_names or []) if t not in found and t not in heads]
    if missing:
        warnings.warn(f"modules_to_save entries {missing} matched no module of {type(model).__name__}")
    claimed = getattr(model, _MODULES_TO_SAVE_ATTR, {}) or {}
    for other, other_names in claimed.items():
        overlap = sorted(set(other_names) & set(names))
        if overlap:
            raise NotImplementedError(
                f"adapter {adapter_name!r} lists {overlap} in modules_to_save, already trained by adapter {other!r}: "
                f"fastpeft keeps one trainable module (not a copy per adapter as PEFT does)"
            )
    return names


def plan_patch(model: nn.Module, lora_config, adapter_name: str = "default") -> PatchPlan:
    """Resolve targets, ranks and modules_to_save for ``patch``; raises on any problem, changes nothing."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    if getattr(model, _PEFT_PATCHED_ATTR, False):
        raise ValueError("this model is a PEFT model patched by fastpeft.patch(peft_model); add adapters through PEFT")
    config = LoraConfig.coerce(lora_config)
    existing = getattr(model, CONFIG_ATTR, None) or {}
    if adapter_name in existing:
        raise ValueError(
            f"adapter {adapter_name!r} is already patched into this model; pass a new adapter_name to add another "
            f"adapter, or call fastpeft.unpatch(model) first"
        )
    if existing and config.bias != "none" and any(c.bias != "none" for c in existing.values()):
        raise ValueError(
            "fastpeft (like PEFT) supports only 1 adapter with bias. When using multiple adapters, set bias to "
            "'none' for all adapters."
        )
    user_modules_to_save = list(config.modules_to_save or [])
    heads = models.TASK_MODULES_TO_SAVE.get(config.task_type)
    if heads:  # PEFT's task models (e.g. PeftModelForSequenceClassification) train the head too
        config.modules_to_save = heads[:] if config.modules_to_save is None else config.modules_to_save + heads

    names_given = isinstance(config.target_modules, set)  # an explicit list, not a regex, "all-linear" or a default
    if config.target_modules is None:
        config.target_modules = models.default_target_modules(model)

    named = list(model.named_modules())
    key_list = [k for k, _ in named]
    lora_prefixes = [n + "." for n, m in named if isinstance(m, LoraLinear)]
    asked_for = config.target_modules
    if isinstance(asked_for, str) and asked_for.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        linear = set(_linear_layer_names(model)) - models.all_linear_exclusions(model, config.task_type)
        config.target_modules = linear
    if isinstance(config.target_modules, set) and len(config.target_modules) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        suffixes = tuple("." + s for s in config.target_modules)
        others = [n for n in key_list if n not in config.target_modules and not n.endswith(suffixes)]
        minimal = find_minimal_target_modules(config.target_modules, others)
        if len(minimal) < len(config.target_modules):
            config.target_modules = minimal

    targets, excluded, considered = [], [], []
    for key, module in named:
        if not key or any(key.startswith(p) for p in lora_prefixes):
            continue
        considered.append(key)
        result = target_module_matches(config, key)
        if isinstance(result, _Excluded):
            excluded.append(key)
        elif result:
            targets.append((key, module))

    if not targets:
        shown = sorted(asked_for) if isinstance(asked_for, (set, frozenset)) else asked_for
        what = f"target_modules={shown!r}"
        if config.layers_to_transform is not None:
            what += f", layers_to_transform={config.layers_to_transform!r}"
        if config.layers_pattern is not None:
            what += f", layers_pattern={config.layers_pattern!r}"
        unexcluded = config.copy()
        unexcluded.exclude_modules, unexcluded.modules_to_save = None, None
        if any(target_module_matches(unexcluded, key) for key in excluded):
            why = "every matching module was excluded by exclude_modules / modules_to_save"
        else:
            why = "no module matched"
        raise ValueError(
            f"fastpeft.patch: {why} ({what}) in {type(model).__name__}; its linear layers are: "
            f"{_shorten_names(_linear_layer_names(model))}"
        )
    if names_given:  # PEFT raises only when nothing matches; a misspelt name beside others is worth a warning
        suffixes = {".".join(parts[i:]) for parts in (k.split(".") for k in considered) for i in range(len(parts))}
        unknown = sorted(asked_for - suffixes)
        if unknown:
            warnings.warn(
                f"target_modules entries {unknown} matched no module of {type(model).__name__} (LoRA goes on the "
                f"other entries' matches); its linear layers are: {_shorten_names(_linear_layer_names(model))}"
            )
    if config.exclude_modules and not excluded:
        warnings.warn(
            f"You have passed exclude_modules={config.exclude_modules} but no modules were excluded. "
            "Please check that exclude_modules was set correctly."
        )
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr)
        unused = sorted(k for k in patterns if not any(re.match(rf"(.*\.)?({k})$", n) for n, _ in targets))
        if unused:
            warnings.warn(f"The following {attr} keys did not match any targeted module and were ignored: {unused}.")

    plan = PatchPlan(adapter_name=adapter_name, config=config)
    for key, module in targets:
        check_wrappable(key, module)
        base = module.base_layer if isinstance(module, LoraLinear) else module
        # PEFT forces fan_in_fan_out per layer type and writes the result back into the config.
        if is_conv1d(base):
            if not config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
                )
                config.fan_in_fan_out = True
        elif config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                "Setting fan_in_fan_out to False."
            )
            config.fan_in_fan_out = False
        plan.targets.append(_Target(key, module, config.rank_for(key), config.alpha_for(key), config.fan_in_fan_out))
    plan.modules_to_save = _resolve_modules_to_save(model, config, adapter_name, user_modules_to_save)
    return plan


# --- applying ---------------------------------------------------------------------------------
def _adapter_dtype(weight: torch.Tensor, autocast_adapter_dtype: bool) -> torch.dtype:
    """PEFT: fp32 adapters over a fp16/bf16 base with autocast_adapter_dtype, else the base dtype."""
    if autocast_adapter_dtype and weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


_MISSING = object()


def _restore_entry(d: dict, key, old) -> None:
    """Put ``d[key]`` back to ``old`` (``_MISSING``: remove it)."""
    if old is _MISSING:
        d.pop(key, None)
    else:
        d[key] = old


def _restore_flags(flags) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def _install(undo: contextlib.ExitStack, model: nn.Module, part, marker: str) -> None:
    """``part.install(model)`` (``mlp`` or ``group``), undone by ``undo`` on an error: ``part.uninstall``
    on every module that did not carry ``marker`` before."""
    undo.callback(part.uninstall, [m for m in model.modules() if marker not in m.__dict__])
    part.install(model)


def apply_plan(model: nn.Module, plan: PatchPlan, autocast_adapter_dtype: bool = True) -> nn.Module:
    """Apply ``plan`` (from :func:`plan_patch`) to ``model``: all of it, or on any error none of it."""
    config, name = plan.config, plan.adapter_name
    was_patched = bool(getattr(model, CONFIG_ATTR, None))
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
                    _adapter_dtype(t.module.base_layer.weight, autocast_adapter_dtype),
                )
            else:
                layer = LoraLinear(
                    t.module, name, t.r, t.alpha, config.lora_dropout, t.fan_in_fan_out, config.use_rslora,
                    config.init_lora_weights, _adapter_dtype(t.module.weight, autocast_adapter_dtype),
                )
                layer._active_adapter = list(current_active)
                parent, child = _get_submodule_parent(model, t.name)
                setattr(parent, child, layer)
                undo.callback(setattr, parent, child, t.module)
        for attr in (CONFIG_ATTR, _MODULES_TO_SAVE_ATTR):
            undo.callback(_restore_entry, model.__dict__, attr, model.__dict__.get(attr, _MISSING))
        configs = dict(getattr(model, CONFIG_ATTR, None) or {})
        configs[name] = config
        setattr(model, CONFIG_ATTR, configs)
        saved = dict(getattr(model, _MODULES_TO_SAVE_ATTR, None) or {})
        saved[name] = list(plan.modules_to_save)
        setattr(model, _MODULES_TO_SAVE_ATTR, saved)

        _install(undo, model, mlp, mlp.FUSED_MLP_ATTR)
        _install(undo, model, group, GROUP_ATTR)
        _guard_adapter_names(undo, model)
        if not was_patched:
            mark_trainable(model)
        else:  # adding an adapter leaves the trainability of everything else as it was (PEFT's add_adapter)
            _restore_flags(previous_flags)
            for _, layer in _fastpeft_layers(model):
                if name in layer.lora_A:
                    trainable = name in layer.active_adapters and not config.inference_mode
                    layer.lora_A[name].weight.requires_grad_(trainable)
                    layer.lora_B[name].weight.requires_grad_(trainable)
        undo.pop_all()  # success: keep every change
    return model


# --- mixed-adapter batches (PEFT's adapter_names=) ----------------------------------------------
def _adapter_names_pre_hook(model, args, kwargs):
    """Forward pre-hook of a patched model: where ``model(..., adapter_names=[...])`` arrives, which
    transformers would swallow in ``**kwargs``, running every row with the active adapter. The
    multi-LoRA implementation takes the names from here to the LoRA layers; until then it raises.
    ``adapter_names=None`` (no mixed batch) is taken out, as PEFT does, for forwards without **kwargs."""
    reject_adapter_names(kwargs)
    if "adapter_names" in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k != "adapter_names"}
        return args, kwargs
    return None


def _generate(self, *args, **kwargs):
    """Instance ``generate`` of a patched model: generate checks its kwargs before any forward."""
    reject_adapter_names(kwargs)
    kwargs.pop("adapter_names", None)
    return type(self).generate(self, *args, **kwargs)


def _guard_adapter_names(undo: contextlib.ExitStack, model: nn.Module) -> None:
    """Install the pre-hook and the ``generate`` above on ``model`` (once), undone by ``undo`` on an error."""
    if _ADAPTER_NAMES_HOOK_ATTR in model.__dict__:
        return
    undo.callback(_unguard_adapter_names, model)
    model.__dict__[_ADAPTER_NAMES_HOOK_ATTR] = model.register_forward_pre_hook(_adapter_names_pre_hook, with_kwargs=True)
    if "generate" not in model.__dict__ and callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(_generate, model)


def _unguard_adapter_names(model: nn.Module) -> None:
    handle = model.__dict__.pop(_ADAPTER_NAMES_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
    if getattr(model.__dict__.get("generate"), "__func__", None) is _generate:
        del model.__dict__["generate"]


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything except the active adapters, their modules_to_save and the biases they ask for."""
    configs = getattr(model, CONFIG_ATTR, None) or {}
    active = set(active_adapters(model))
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in _fastpeft_layers(model):
        for adapter in layer.lora_A.keys():
            trainable = adapter in active and not configs[adapter].inference_mode
            layer.lora_A[adapter].weight.requires_grad_(trainable)
            layer.lora_B[adapter].weight.requires_grad_(trainable)
    saved = getattr(model, _MODULES_TO_SAVE_ATTR, None) or {}
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
            for _, layer in _fastpeft_layers(model):
                if layer.base_layer.bias is not None:
                    layer.base_layer.bias.requires_grad_(True)


def set_adapter(model: nn.Module, adapter_names) -> None:
    """Make ``adapter_names`` (str or list) the active adapters of a fastpeft-patched model (PEFT's set_adapter)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    configs = getattr(model, CONFIG_ATTR, None) or {}
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(configs)}")
    for _, layer in _fastpeft_layers(model):
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
    has_peft_layers = is_peft_model(model) or any(is_peft_lora_layer(m) for m in model.modules())
    if has_peft_layers:
        if lora_config is not None:
            raise ValueError(
                "fastpeft.patch(peft_model) takes no lora_config: the PEFT model already has its adapters "
                "(add more with peft_model.add_adapter)"
            )
        return _attach_options(_patch_peft_model(model), options)
    if lora_config is None:
        raise TypeError(
            f"fastpeft.patch needs a lora_config for {type(model).__name__}, which has no PEFT adapters, e.g. "
            f"fastpeft.LoraConfig(r=16, target_modules='all-linear') (fastpeft.LoraConfig() for PEFT's defaults); "
            f"only a peft.PeftModel is patched without one"
        )
    plan = plan_patch(model, lora_config, adapter_name)
    return _attach_options(apply_plan(model, plan, autocast_adapter_dtype), options)


def _attach_options(model: nn.Module, options: Optional[Options]) -> nn.Module:
    """Give the model's LoRA layers and fused MLPs its options (``options``, else those it had, if any)."""
    options = options or model.__dict__.get(OPTIONS_ATTR)
    if options is not None:
        for module in model.modules():
            if module is model or isinstance(module, LoraLinear) or is_peft_lora_layer(module) \
                    or mlp.FUSED_MLP_ATTR in module.__dict__:
                module.__dict__[OPTIONS_ATTR] = options
    return model


def _detach_options(model: nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop(OPTIONS_ATTR, None)


# --- PEFT models ------------------------------------------------------------------------------
def _accelerated_forward(self, x, *args, **kwargs):
    """Instance ``forward`` of a PEFT lora.Linear: fastpeft's compute, PEFT's for what it cannot do."""
    if kwargs or not peft_fast_path_ok(self):  # adapter_names=..., variant kwargs, DoRA, lora_bias
        return type(self).forward(self, x, *args, **kwargs)
    return lora_forward(self, x, *args)


def _why_not_accelerated(layer) -> Optional[str]:
    cls = type(layer)
    if cls.__module__ != "peft.tuners.lora.layer" or cls.__name__ != "Linear":
        return f"{cls.__module__}.{cls.__name__}"
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    try:
        check_wrappable("", base)
    except (TypeError, NotImplementedError):
        return f"base layer {type(base).__name__}"
    if base is not layer.base_layer:
        return "nested base layer"
    if any(getattr(layer, "lora_variant", {}) or {}):
        return "LoRA variant (" + ", ".join(type(v).__name__ for v in layer.lora_variant.values()) + ")"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias"
    return None


def _patch_peft_model(peft_model):
    configs = getattr(peft_model, "peft_config", {}) or {}
    for name, cfg in configs.items():
        peft_type = getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", None))
        if peft_type != "LORA":
            raise ValueError(f"fastpeft accelerates LoRA adapters only; adapter {name!r} is {peft_type}")
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
            + _shorten_names(skipped, limit=20)
        )
    with contextlib.ExitStack() as undo:  # as in apply_plan: an error undoes every change
        for layer in todo:
            undo.callback(_restore_peft_forward, layer)
            layer.forward = types.MethodType(_accelerated_forward, layer)
            setattr(layer, ACCELERATED_ATTR, True)
        _install(undo, peft_model, mlp, mlp.FUSED_MLP_ATTR)
        _install(undo, peft_model, group, GROUP_ATTR)
        setattr(peft_model, _PEFT_PATCHED_ATTR, True)
        undo.pop_all()
    return peft_model


def _restore_peft_forward(layer) -> None:
    if layer.__dict__.pop(ACCELERATED_ATTR, False):
        layer.__dict__.pop("forward", None)


def _unpatch_peft_model(peft_model) -> None:
    mlp.uninstall(peft_model.modules())
    group.uninstall(peft_model.modules())
    for _, layer in peft_model.named_modules():
        _restore_peft_forward(layer)
    peft_model.__dict__.pop(_PEFT_PATCHED_ATTR, None)


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
    if getattr(model, _PEFT_PATCHED_ATTR, False) or is_peft_model(model):
        _unpatch_peft_model(model)  # PEFT's forwards come back; PEFT's layers stay
        _detach_options(model)
        return model
    layers = _fastpeft_layers(model)
    if not layers and not getattr(model, CONFIG_ATTR, None):
        raise ValueError(f"{type(model).__name__} is not patched by fastpeft: nothing to unpatch")
    mlp.uninstall(model.modules())
    group.uninstall(model.modules())
    _unguard_adapter_names(model)
    _detach_options(model)
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
    model.__dict__.pop(_MODULES_TO_SAVE_ATTR, None)
    return model


def merge(model: nn.Module, safe_merge: bool = False, adapter_names=None) -> None:
    """Merge the active adapters (or ``adapter_names``) into the base weights of every LoRA layer."""
    check_model(model, "fastpeft.merge")
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge")
    for _, layer in layers:
        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)


def unmerge(model: nn.Module) -> None:
    """Subtract the merged adapters from the base weights of every LoRA layer."""
    check_model(model, "fastpeft.unmerge")
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to unmerge")
    merged = [layer for _, layer in layers if layer.merged]
    if not merged:
        warnings.warn("Already unmerged. Nothing to do.")
    for layer in merged:
        layer.unmerge()
