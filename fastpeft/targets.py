"""Which modules an adapter goes on: PEFT's target matching, which modules fastpeft can wrap, and the plan.

``plan_patch`` resolves a config against a model exactly as PEFT's ``inject_adapter`` would
(``check_target_module_exists``, ``"all-linear"``, the condensed target list, ``exclude_modules``,
``layers_to_transform``, rank / alpha patterns, ``fan_in_fan_out`` per layer type, modules_to_save) and
checks every target can be wrapped; it raises on any problem and changes nothing (the config aside, into
which PEFT writes the resolved values too). fastpeft/patch.py applies the plan.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch.nn as nn

from . import models, qlora
from .config import INCLUDE_LINEAR_LAYERS_SHORTHAND, LoraConfig
from .layer import LoraLinear, is_conv1d
from .model_state import PEFT_PATCHED_ATTR, adapter_configs, is_peft_lora_layer, lora_layers, modules_to_save

MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20  # PEFT condenses longer target lists into suffixes


# --- the model's layers, as error messages name them --------------------------------------------
def shorten_names(names: list[str], limit: int = 40) -> str:
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
    nn.Linear's forward, models.has_linear_forward), a quantized bitsandbytes Linear4bit or a
    transformers Conv1D."""
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    if isinstance(module, LoraLinear) or is_conv1d(module):
        return
    if is_peft_lora_layer(module):
        raise TypeError(
            f"fastpeft cannot apply LoRA to {name!r}: it is already a PEFT LoRA layer ({cls}); call "
            f"fastpeft.patch(model) without a config to accelerate the PEFT adapters instead"
        )
    if isinstance(module, nn.Linear):
        if qlora.is_4bit(module):
            qlora.check_4bit(name, module)
            return
        weight_cls = type(module.weight).__name__
        if weight_cls == "Int8Params" or any(c.__name__ == "Linear8bitLt" for c in type(module).__mro__):
            raise NotImplementedError(
                f"fastpeft cannot apply LoRA to {name!r}: it is an 8-bit bitsandbytes {cls} (weight {weight_cls}); "
                f"fastpeft supports 4-bit (load_in_4bit) and float bases, not load_in_8bit"
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
    claimed = modules_to_save(model)
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
    if getattr(model, PEFT_PATCHED_ATTR, False):
        raise ValueError("this model is a PEFT model patched by fastpeft.patch(peft_model); add adapters through PEFT")
    config = LoraConfig.coerce(lora_config)
    existing = adapter_configs(model)
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
            f"{shorten_names(_linear_layer_names(model))}"
        )
    if names_given:  # PEFT raises only when nothing matches; a misspelt name beside others is worth a warning
        suffixes = {".".join(parts[i:]) for parts in (k.split(".") for k in considered) for i in range(len(parts))}
        unknown = sorted(asked_for - suffixes)
        if unknown:
            warnings.warn(
                f"target_modules entries {unknown} matched no module of {type(model).__name__} (LoRA goes on the "
                f"other entries' matches); its linear layers are: {shorten_names(_linear_layer_names(model))}"
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
