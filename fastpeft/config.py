"""``LoraConfig``: PEFT's LoRA configuration, the fields fastpeft computes with, in PEFT's JSON form.

Field names, meanings and defaults are PEFT's (``peft/tuners/lora/config.py``), so an
``adapter_config.json`` written by either library loads in the other. PEFT options that change the
numbers and that fastpeft does not implement (DoRA, lora_bias, LoftQ/PiSSA/... initialisations,
layer replication, QALoRA, aLoRA, ...) raise ``NotImplementedError`` naming the option; they are
never silently dropped. Importing this module never imports peft.
"""
from __future__ import annotations

import copy
import json
import math
import numbers
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "LORA"
# The PEFT release whose on-disk format fastpeft writes; recorded as `peft_version` when none is known.
PEFT_FORMAT_VERSION = "0.21.0"
BIAS_CHOICES = ("none", "all", "lora_only")
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"


def _empty(value) -> bool:
    return value is None or value is False or (hasattr(value, "__len__") and len(value) == 0)


# PEFT LoRA options fastpeft does not implement: option -> "is this value harmless?" (the PEFT default,
# or a value PEFT itself ignores). A harmful value raises NotImplementedError; a harmless one is dropped.
_UNSUPPORTED_OPTIONS = {
    "layer_replication": _empty,
    "use_qalora": _empty,
    "alora_invocation_tokens": _empty,
    "velora_config": _empty,
    "monteclora_config": _empty,
    "megatron_config": _empty,
    "trainable_token_indices": _empty,
    "target_parameters": _empty,
    "use_bdlora": _empty,
    "arrow_config": _empty,
    "kasa_config": _empty,
    "ensure_weight_tying": _empty,
}
# PEFT options that never change the numbers of a plain LoRA adapter (they only matter together with an
# unsupported option, which raises, or at run time): dropped silently when read.
_IGNORED_OPTIONS = {
    "megatron_core",  # only used with megatron_config
    "qalora_group_size",  # only used with use_qalora
    "loftq_config",  # only used with init_lora_weights="loftq"
    "eva_config",  # only used with init_lora_weights="eva"
    "corda_config",  # only used with init_lora_weights="corda"
    "lora_ga_config",  # only used with init_lora_weights="lora_ga"
    "astra_config",  # only used with init_lora_weights="astra" (peft >= 0.22)
    "runtime_config",  # run-time only; PEFT drops it from JSON too
}


def pattern_key(pattern_keys, module_name: str) -> Optional[str]:
    """PEFT's ``get_pattern_key``: the first key with ``re.match(rf"(.*\\.)?({key})$", module_name)``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _normalize_init(value):
    if value is True or value is False:
        return value
    if isinstance(value, str) and value.lower() == "gaussian":
        return "gaussian"
    raise NotImplementedError(
        f"init_lora_weights={value!r} is not supported by fastpeft (supported: True, False, 'gaussian')"
    )


def _enum_value(value):
    """PEFT's TaskType / PeftType are str enums: their plain string."""
    return getattr(value, "value", value)


def _type_error(name: str, expected: str, value) -> TypeError:
    return TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(name: str, value) -> int:
    """``value`` as a Python int (NumPy integers too); anything else, a bool or a str included, raises."""
    if not _is_int(value):
        raise _type_error(name, "an int", value)
    return int(value)


def _number(name: str, value):
    """``value`` as a finite Python int or float (NumPy scalars too); anything else raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _type_error(name, "a number (int or float)", value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return int(value) if _is_int(value) else float(value)


def _names(name: str, value, str_ok: bool = True):
    """None, a str (a regex, when ``str_ok``) or a list of str; a tuple or set of str comes back as a list."""
    if value is None or (str_ok and isinstance(value, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _type_error(name, "None, a str or a list of str" if str_ok else "None or a list of str", value)


_BOOL_FIELDS = ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode")
_OPTIONAL_STR_FIELDS = ("base_model_name_or_path", "revision", "peft_version")


@dataclass
class LoraConfig:
    """PEFT's LoRA configuration (the subset of fields fastpeft implements), see ``peft.LoraConfig``.

    Unlike PEFT, every field's type is checked here: a number given as a string (``r="8"``, as YAML or
    argparse may hand it over) raises ``TypeError`` naming the field; NumPy numbers become Python ones.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    # bookkeeping PEFT writes to adapter_config.json
    peft_type: str = PEFT_TYPE
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None

    def __post_init__(self):
        self.peft_type = _enum_value(self.peft_type)
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"fastpeft supports only LoRA adapters (peft_type 'LORA'), got peft_type={self.peft_type!r}")
        self.task_type = _enum_value(self.task_type)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {', '.join(TASK_TYPES)} or None, got {self.task_type!r}")
        self.r = _int("r", self.r)
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        self.lora_alpha = _number("lora_alpha", self.lora_alpha)
        self.lora_dropout = _number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:  # (PEFT accepts 1, which zeroes the LoRA path)
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise _type_error(name, "True or False", getattr(self, name))
        for name in _OPTIONAL_STR_FIELDS:
            if not isinstance(getattr(self, name), (str, type(None))):
                raise _type_error(name, "None or a str", getattr(self, name))
        if not isinstance(self.auto_mapping, (dict, type(None))):
            raise _type_error("auto_mapping", "None or a dict", self.auto_mapping)
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {', '.join(repr(b) for b in BIAS_CHOICES)}, got {self.bias!r}")
        if self.lora_bias:
            raise NotImplementedError("lora_bias=True is not supported by fastpeft yet")
        self.init_lora_weights = _normalize_init(self.init_lora_weights)
        # PEFT keeps list targets as sets (matching is set membership / suffix); JSON writes them as lists.
        for name in ("target_modules", "exclude_modules"):
            names = _names(name, getattr(self, name))
            setattr(self, name, set(names) if isinstance(names, list) else names)
        self.modules_to_save = _names("modules_to_save", self.modules_to_save, str_ok=False)
        self.layers_pattern = _names("layers_pattern", self.layers_pattern)
        layers = self.layers_to_transform
        if isinstance(layers, (list, tuple)) and all(_is_int(i) for i in layers):
            self.layers_to_transform = [int(i) for i in layers]
        elif _is_int(layers):
            self.layers_to_transform = int(layers)
        elif layers is not None:
            raise _type_error("layers_to_transform", "None, an int or a list of int", layers)
        for name, convert in (("rank_pattern", _int), ("alpha_pattern", _number)):
            patterns = getattr(self, name) or {}
            if not isinstance(patterns, dict) or not all(isinstance(k, str) for k in patterns):
                raise _type_error(name, "a dict of module-name patterns (str) to numbers", patterns)
            setattr(self, name, {k: convert(f"{name}[{k!r}]", v) for k, v in patterns.items()})
        for key, value in self.rank_pattern.items():
            if value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] should be a positive integer but the value passed is {value}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")

    # --- per-module r / alpha ------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        key = pattern_key(self.rank_pattern.keys(), module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern.keys(), module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        """alpha / r (alpha / sqrt(r) with rsLoRA) for this module, after rank_pattern / alpha_pattern."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --- dict / JSON ---------------------------------------------------------------------------
    def copy(self) -> "LoraConfig":
        return copy.deepcopy(self)

    def to_dict(self) -> dict:
        """PEFT's ``asdict`` form with sets turned into (sorted) lists."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, (set, frozenset)):
                out[key] = sorted(value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LoraConfig":
        """Build from a PEFT config dict (``adapter_config.json``); see the module docstring for what raises."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a dict of LoRA config fields, got {type(data).__name__}")
        data = dict(data)
        peft_type = _enum_value(data.get("peft_type", PEFT_TYPE))
        if peft_type != PEFT_TYPE:
            raise ValueError(f"fastpeft supports only LoRA adapters (peft_type 'LORA'), got peft_type={peft_type!r}")
        known = {f.name for f in fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _UNSUPPORTED_OPTIONS:
                if not _UNSUPPORTED_OPTIONS[key](value):
                    raise NotImplementedError(f"the PEFT LoRA option {key}={value!r} is not supported by fastpeft yet")
            elif key in _IGNORED_OPTIONS:
                continue
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"ignoring config keys that fastpeft's LoraConfig does not know: {sorted(unknown)}")
        return cls(**kwargs)

    @classmethod
    def from_peft(cls, peft_config) -> "LoraConfig":
        """Read a ``peft.LoraConfig`` instance by attribute (peft is never imported here)."""
        peft_type = _enum_value(getattr(peft_config, "peft_type", None))
        if peft_type != PEFT_TYPE:
            raise ValueError(
                f"fastpeft supports only LoRA configs (peft_type 'LORA'), got {type(peft_config).__name__} "
                f"with peft_type={peft_type!r}"
            )
        data = {f.name: copy.deepcopy(getattr(peft_config, f.name)) for f in fields(cls) if hasattr(peft_config, f.name)}
        for key in _UNSUPPORTED_OPTIONS:
            if hasattr(peft_config, key) and not _UNSUPPORTED_OPTIONS[key](getattr(peft_config, key)):
                raise NotImplementedError(
                    f"the PEFT LoRA option {key}={getattr(peft_config, key)!r} is not supported by fastpeft yet"
                )
        return cls(**data)

    @classmethod
    def coerce(cls, config) -> "LoraConfig":
        """A fresh fastpeft LoraConfig from None, a fastpeft/PEFT LoraConfig or a dict (never the caller's object)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config.copy()
        if isinstance(config, dict):
            return cls.from_dict(config)
        if hasattr(config, "peft_type"):
            return cls.from_peft(config)
        raise TypeError(
            f"lora_config must be a fastpeft.LoraConfig, a peft.LoraConfig or a dict, got {type(config).__name__}"
        )

    def save(self, directory: str, auto_mapping: Optional[dict] = None) -> str:
        """Write ``directory/adapter_config.json`` as PEFT does (sorted keys, indent 2, inference_mode true)."""
        if os.path.isfile(directory):
            raise ValueError(f"expected a directory to save the adapter config in, got the file {directory}")
        os.makedirs(directory, exist_ok=True)
        out = self.to_dict()
        out["inference_mode"] = True
        if out["peft_version"] is None:
            out["peft_version"] = PEFT_FORMAT_VERSION
        if auto_mapping is not None:
            out["auto_mapping"] = auto_mapping
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as f:
            f.write(json.dumps(out, indent=2, sort_keys=True))
        return path

    @classmethod
    def from_json_file(cls, path: str) -> "LoraConfig":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"adapter config not found: {path}") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the adapter config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"cannot read the adapter config {path}: expected a JSON object, got {type(data).__name__}")
        if "peft_type" not in data:
            raise ValueError(f"the adapter config {path} has no 'peft_type' key")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, directory: str, subfolder: Optional[str] = None) -> "LoraConfig":
        path = os.path.join(directory, subfolder) if subfolder else directory
        return cls.from_json_file(os.path.join(path, CONFIG_NAME))


def resolve_config(config: Any) -> LoraConfig:
    """Alias of :meth:`LoraConfig.coerce`."""
    return LoraConfig.coerce(config)
