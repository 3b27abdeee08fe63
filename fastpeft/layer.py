"""LoRA layers: fastpeft's own ``LoraLinear`` and the forward it shares with PEFT's ``lora.Linear`` (and
AdaLoRA's ``SVDLinear``, whose adapters enter as LoRA adapters: fastpeft/adalora.py).

``LoraLinear`` keeps PEFT's attribute names and state-dict layout (``base_layer``, ``lora_A.<name>``,
``lora_B.<name>``, ``scaling``, ``lora_dropout``, ``merged_adapters``), so one forward,
:func:`lora_forward`, serves both a fastpeft-patched model and a PEFT model handed to
``fastpeft.patch``.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from . import adalora, dora, functional, options, qlora, reference


def conv1d_class():
    """transformers' GPT-2 style Conv1D (weight stored (in, out)), or None if unavailable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def _param(module: nn.Module, name: str):
    """``module.<name>`` for a parameter (or None), read from ``_parameters`` without nn.Module's
    ``__getattr__`` fallback (the hot path reads a few per call)."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name, None)


def base_weight(layer):
    """The base weight as (out_features, in_features): a view, transposed for fan_in_fan_out; a 4-bit
    weight (bitsandbytes' Params4bit) as its ``qlora.Base4bit``."""
    w = _param(layer._modules["base_layer"], "weight")
    if type(w).__name__ == "Params4bit":
        return qlora.base_of(layer, w)
    return w.T if layer.fan_in_fan_out else w


ACCELERATED_ATTR = "_fastpeft_accelerated"  # set on each PEFT lora.Linear whose forward fastpeft replaced
GROUP_ATTR = "_fastpeft_group"  # on each projection of a shared-input group: (the group, its index), group.py


def has_lora(module) -> bool:
    """Whether ``module`` is a LoRA layer, fastpeft's or PEFT's (``lora_A`` beside a ``base_layer``)."""
    return module is not None and hasattr(module, "lora_A") and hasattr(module, "base_layer")


# PEFT's LoRA variants whose forward fastpeft computes (on a linear layer): DoRA
SUPPORTED_VARIANTS = {"DoraLinearVariant"}


def peft_fast_path_ok(layer) -> bool:
    """Whether fastpeft's forward computes exactly what PEFT's would for this PEFT layer's call: plain
    LoRA or DoRA adapters without lora_bias, and DoRA only as the one active adapter (PEFT feeds each
    further adapter the sum so far as its DoRA base); AdaLoRA's by fastpeft/adalora.py."""
    if adalora.is_adalora_layer(layer):
        return adalora.fast_path_ok(layer)
    variants = getattr(layer, "lora_variant", {}) or {}
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    for name in active:
        if name in variants and (type(variants[name]).__name__ not in SUPPORTED_VARIANTS or len(active) > 1):
            return False
        if layer.lora_B[name].bias is not None:
            return False
    return getattr(layer, "cast_input_dtype_enabled", True)


def magnitude(layer, name: str):
    """The DoRA magnitude module (``lora_magnitude_vector[name]``, its ``weight`` (out,)) of adapter
    ``name``, or None for a plain LoRA adapter."""
    if not getattr(layer, "use_dora", {}).get(name, False):
        return None
    return layer._modules["lora_magnitude_vector"][name]


def adapter_parameters(layer, name: str) -> list:
    """The trainable tensors of adapter ``name`` in this layer: lora_A, lora_B (and DoRA's magnitude)."""
    params = [layer.lora_A[name].weight, layer.lora_B[name].weight]
    mag = magnitude(layer, name)
    return params + ([mag.weight] if mag is not None else [])


def _adapter(layer, name: str):
    """(lora_A weight, lora_B weight, scaling, dropout p) of adapter ``name`` (AdaLoRA's: A ⊙ E / ranknum
    as A, fastpeft/adalora.py); lora_bias raises."""
    modules = layer._modules
    if "lora_E" in modules:
        return adalora.adapter_tensors(layer, name)
    lora_a, lora_b = modules["lora_A"][name], modules["lora_B"][name]
    if _param(lora_b, "bias") is not None:
        raise NotImplementedError(f"lora_bias=True is not supported by fastpeft (adapter {name!r})")
    drop = modules["lora_dropout"][name]
    return (_param(lora_a, "weight"), _param(lora_b, "weight"), layer.scaling[name],
            drop.p if isinstance(drop, nn.Dropout) else 0.0)


def _active(layer) -> list:
    """The active adapters that this layer has (PEFT keeps a str or a list in ``_active_adapter``)."""
    active = layer._active_adapter
    lora_a = layer._modules["lora_A"]
    if isinstance(active, str):
        return [active] if active in lora_a else []
    return [name for name in active if name in lora_a]


def single_lora(layer):
    """(weight, bias, lora_A, lora_B, scaling, dropout p) of a fastpeft-computed LoRA layer that adds
    exactly one active, unmerged adapter to a frozen base; None for anything else (adapters disabled
    or merged, several active, a PEFT layer fastpeft does not compute, a trainable base)."""
    peft_computed = layer.__dict__.get(ACCELERATED_ATTR, False) and peft_fast_path_ok(layer)
    if not (isinstance(layer, LoraLinear) or peft_computed) or layer.disable_adapters or layer.merged:
        return None
    active = _active(layer)
    base = layer.base_layer
    if len(active) != 1 or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if magnitude(layer, active[0]) is not None:  # DoRA: its own op (fastpeft/dora.py)
        return None
    return (base_weight(layer), base.bias) + _adapter(layer, active[0])


def lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of a LoRA layer, fastpeft's or PEFT's: base + the active adapters, fused when possible;
    with ``adapter_names`` (PEFT's mixed batch: one adapter per row) ``multi_lora.mixed_batch_forward``."""
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        from .multi_lora import mixed_batch_forward

        return mixed_batch_forward(layer, x, names, *args, **kwargs)
    if not args and not torch.compiler.is_compiling():  # q/k/v computed together (group.py)
        grouped = layer.__dict__.get(GROUP_ATTR)
        if grouped is not None:
            y = grouped[0].output(grouped[1], layer, x)
            if y is not None:
                return y
    base = layer._modules["base_layer"]
    if layer._disable_adapters:
        if layer.merged_adapters:
            layer.unmerge()
        return base(x, *args, **kwargs)
    if layer.merged_adapters:
        return base(x, *args, **kwargs)
    active = _active(layer)
    if not active:
        return base(x, *args, **kwargs)
    weight, bias, training = base_weight(layer), _param(base, "bias"), layer.training
    backend = options.of(layer).backend
    if any(magnitude(layer, name) is not None for name in active):
        if len(active) > 1:
            raise NotImplementedError(f"fastpeft computes DoRA for one active adapter at a time, got {active}")
        lora_a, lora_b, scaling, p = _adapter(layer, active[0])
        mag = magnitude(layer, active[0])
        return functional.dora_linear(mag, x, weight, bias, lora_a, lora_b, mag.weight, scaling, p, training, backend)
    y = None
    for name in active:
        lora_a, lora_b, scaling, p = _adapter(layer, name)
        if y is None:
            y = functional.lora_linear(x, weight, bias, lora_a, lora_b, scaling, p, training, backend)
        else:  # further active adapters (rare): their LoRA branch alone (no base weight)
            y = y + functional.lora_linear(x, None, None, lora_a, lora_b, scaling, p, training, backend).to(y.dtype)
    return y


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear``, bitsandbytes ``Linear4bit`` (QLoRA, fastpeft/qlora.py) or transformers
    ``Conv1D`` plus trainable LoRA adapters.

    y = base(x) + s·lora_B(lora_A(drop(x))) with lora_A (r × in), lora_B (out × r), s = alpha/r
    (alpha/√r with rsLoRA). The base weight and bias stay where they were (``base_layer``).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        use_rslora: bool = False,
        init_lora_weights=True,
        adapter_dtype: torch.dtype | None = torch.float32,
        use_dora: bool = False,
    ):
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            in_features, out_features = base_layer.in_features, base_layer.out_features
            if fan_in_fan_out:
                warnings.warn("fan_in_fan_out=True but the target is an nn.Linear: setting fan_in_fan_out=False")
                fan_in_fan_out = False
        elif is_conv1d(base_layer):
            in_features, out_features = base_layer.weight.shape
            fan_in_fan_out = True
        else:
            raise TypeError(
                f"fastpeft LoRA supports nn.Linear and transformers Conv1D layers, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = fan_in_fan_out
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' magnitudes (PEFT's name)
        self.merged_adapters: list[str] = []
        self._active_adapter: list[str] = [adapter_name]
        self._disable_adapters = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype,
                          use_dora)

    # --- PEFT-compatible state -------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str:
        return self._active_adapter[0]

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def set_adapter(self, adapter_names) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.lora_A:
                raise KeyError(f"unknown adapter {name!r}; this layer has {sorted(self.lora_A.keys())}")
        self._active_adapter = names

    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout=0.0, use_rslora=False,
                     init_lora_weights=True, adapter_dtype=torch.float32, use_dora=False) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = reference.lora_scaling(r, lora_alpha, use_rslora)
        self.use_dora[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        w = self.base_layer.weight
        dtype = adapter_dtype if adapter_dtype is not None else w.dtype
        if not dtype.is_floating_point:  # quantized base weights: adapters in the compute dtype
            dtype = torch.float32
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        if use_dora:
            self.use_dora[adapter_name] = True
            self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude(self._dora_norm(adapter_name).to(dtype))

    @torch.no_grad()
    def _dora_norm(self, adapter_name: str) -> torch.Tensor:
        """‖W + s·B·A‖ per output row (out,) fp32 as PEFT computes it (W + the dense delta)."""
        w = self._base_dense()
        delta = reference.lora_delta_weight(self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight,
                                            self.scaling[adapter_name])
        return torch.linalg.norm(w.float() + delta.float(), dim=1)

    def drop_adapter(self, adapter_name: str) -> None:
        """Undo ``update_layer(adapter_name, ...)``, as much of it as was done (patch's rollback)."""
        for store in (self.r, self.lora_alpha, self.scaling, self.use_dora, self.lora_dropout, self.lora_A, self.lora_B,
                      self.lora_magnitude_vector):
            if adapter_name in store:
                del store[adapter_name]

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights=True) -> None:
        if init_lora_weights is False:
            return  # nn.Linear's own init for both (B != 0): a non-identity adapter, as in PEFT
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter_name])
        else:
            raise NotImplementedError(f"init_lora_weights={init_lora_weights!r} is not supported by fastpeft")
        nn.init.zeros_(b)

    # --- merge ------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        delta = reference.lora_delta_weight(a, b, self.scaling[adapter_name], self.fan_in_fan_out)
        weight = self.base_layer.weight
        return delta.to(qlora.adapter_dtype_of(weight) if qlora.is_4bit(self.base_layer) else weight.dtype)

    def _base_dense(self) -> torch.Tensor:
        """The base weight (out, in) as a dense tensor (a 4-bit one dequantized)."""
        return dora.dense_weight(base_weight(self))

    def _oriented(self, delta: torch.Tensor) -> torch.Tensor:
        """A delta given (out, in) in the base weight's own layout (Conv1D: (in, out))."""
        return delta.T if self.fan_in_fan_out else delta

    def _add_to_base(self, delta: torch.Tensor, safe_merge: bool = False, name: str = "") -> None:
        """W += delta (a 4-bit W: dequantized, added, requantized with its settings; lossy)."""
        if qlora.is_4bit(self.base_layer):
            qlora.add_to_4bit(self.base_layer, delta, safe_merge, name)
            return
        weight = self.base_layer.weight
        if safe_merge:
            merged = weight.data + delta
            if not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.data.copy_(merged)
        else:
            weight.data += delta

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        for name in names:
            if name not in self.lora_A:
                continue
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; merging it again does nothing")
                continue
            delta = self.get_delta_weight(name).to(self.base_layer.weight.device)
            if name in self.lora_magnitude_vector:  # DoRA: W ← g ⊙ (W + ΔW), g = m / ‖W + ΔW‖ (kept for unmerge)
                w, d = self._base_dense().float(), self._oriented(delta).float()
                norm = torch.linalg.norm(w + d, dim=1)
                g = (self.lora_magnitude_vector[name].weight.float() / norm)[:, None]
                self.__dict__.setdefault("_dora_merge_norms", {})[name] = norm
                delta = self._oriented(((g - 1) * w + g * d).to(delta.dtype))
            self._add_to_base(delta, safe_merge, name)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("already unmerged; nothing to do")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.get_delta_weight(name).to(self.base_layer.weight.device)
            if name in self.lora_magnitude_vector:  # DoRA: W ← W' / g - ΔW with merge's g
                norm = self.__dict__.get("_dora_merge_norms", {}).pop(name)
                g = (self.lora_magnitude_vector[name].weight.float() / norm)[:, None]
                w, d = self._base_dense().float(), self._oriented(delta).float()
                self._add_to_base(self._oriented((w * (1 / g - 1) - d).to(delta.dtype)))
                continue
            self._add_to_base(-delta)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return lora_forward(self, x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fan_in_fan_out={self.fan_in_fan_out}"
