"""Many LoRA adapters in one batch, one adapter per row (serving).

Two ways in, one computation (``multi_lora``: y += s[i]·(x·A[i]ᵀ)·B[i]ᵀ per token over stacked adapter
weights, the kernels of kernels/multi_lora.py on CUDA tensors, the reference path elsewhere):

- PEFT's API on a patched model: ``model(..., adapter_names=[...])`` and ``model.generate(...,
  adapter_names=[...])`` with the adapters loaded by ``load_adapter(..., adapter_name=...)``;
  ``"__base__"`` rows get the base model alone. PEFT's semantics and errors (not in training mode,
  names that exist in some layer, no merged adapters, one name per row; ``num_beams`` repeats each
  name). ``mixed_batch(model, names)`` hands the names to every LoRA layer for the forwards inside it;
  each layer stacks its adapters' weights once (kept until one of them changes, which inside one
  forward or generate is checked at the layer's first forward only) and keeps its kernel launches.
- ``MultiLora(model, max_adapters=..., max_rank=..., target_modules=...)``: a serving wrapper with
  preallocated slots (stacked A (slots, r_max, in), B (slots, out, r_max), per-slot scaling and rank),
  PEFT-format adapters loaded into and unloaded from slots, and ``with ml.use([...]):`` choosing each
  row's adapter for ``model(...)`` and ``model.generate(...)``.
"""
from __future__ import annotations

import contextlib
import json
import operator
import os
import re
import threading
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn

from . import reference
from .kernels import tuning
from .kernels.common import fp32_precision
from .backend import interpreter_enabled, use_triton

BASE = "__base__"


def multi_lora(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, lora_a: torch.Tensor,
               lora_b: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor, backend=None, seg=None) -> torch.Tensor:
    """y (T, N) + s[i]·(x·A[i, :r_i]ᵀ)·B[i, :, :r_i]ᵀ for each token's slot i (indices (T,), -1: none):
    x (T, K), A (S, R, K), B (S, N, R), scales (S,) fp32, ranks (S,) int32; seg: the kernels'
    ``segments(indices, S)`` where the caller has it. The kernels add into y in place (and return it);
    the reference path returns a new tensor."""
    if use_triton(x, backend):
        from .kernels.multi_lora import multi_lora as kernel

        return kernel(x, y, indices, lora_a, lora_b, scales, ranks, seg)
    return reference.multi_lora(x, y, indices, lora_a, lora_b, scales, ranks)


# The layer as one route with its base product (kernels/multi_lora.py multi_lora_linear: the expand
# writes bias + the LoRA terms, then cuBLAS adds x·Wᵀ in its epilogue) where the base layer allows it
# (``fusable``), instead of F.linear then the LoRA terms added in place: True / False, or None for the
# FASTPEFT_MULTI_LORA_FUSED switch (kernels/tuning.py; default off: at par with the in-place route,
# docs/performance.md, "Multi-LoRA serving").
FUSE_BASE: Optional[bool] = None


def _fuse_base() -> bool:
    if FUSE_BASE is not None:
        return FUSE_BASE
    return bool(tuning.pinned(tuning.MULTI_LORA_FUSED))


def fusable(base_layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether ``base_layer(x)`` is a plain product ``multi_lora_linear`` can run itself (``plain``),
    where the fused route is on."""
    return _fuse_base() and plain(base_layer, x, args, kwargs)


def plain(base_layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether ``base_layer(x)`` is a plain product a launcher can run itself: an ``nn.Linear`` (not a
    subclass) without hooks, its weight in x's dtype, called with x alone, no autocast."""
    return (type(base_layer) is nn.Linear and not args and not kwargs
            and base_layer._parameters["weight"].dtype == x.dtype and x.dtype in _FUSED_DTYPES
            and not base_layer._forward_hooks and not base_layer._forward_pre_hooks
            and not torch.is_autocast_enabled(x.device.type))


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# MultiLora runs a bf16 batch as the kernels' ``multi_lora_linear_tma`` from this many tokens, where its
# rows bring at least TMA_MIN_RUN tokens each (so that each output tile's rows hold one or two adapters)
TMA_MIN_TOKENS, TMA_MIN_RUN = 4096, 64


def prefill_tma(base_layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether a MultiLora layer runs its batch x (rows, tokens per row, K) as the kernels'
    ``multi_lora_linear_tma`` (the TMA matmul with the LoRA terms in its epilogue: no pass over y
    besides the product's): a prefill batch (TMA_MIN_TOKENS, TMA_MIN_RUN), bf16, a ``plain`` base and
    the operands that kernel takes. FASTPEFT_MULTI_LORA_TMA=1 takes it for any batch the rest allows, 0
    never (kernels/tuning.py). Cheap where it says no at a decode step's shape (one token per row)."""
    pinned = tuning.pinned(tuning.MULTI_LORA_TMA)
    if pinned is False or (pinned is None and (x.dim() < 3 or x.shape[-2] < TMA_MIN_RUN
                                               or x.numel() < TMA_MIN_TOKENS * x.shape[-1])):
        return False
    if x.dtype != torch.bfloat16 or not plain(base_layer, x, args, kwargs):
        return False
    if torch.compiler.is_compiling():  # no data pointers to check: the op falls back where they do not fit
        return True
    from .kernels.multi_lora import multi_lora_tma_ok

    return x.stride(-1) == 1 and multi_lora_tma_ok(x.reshape(-1, x.shape[-1]), base_layer._parameters["weight"])


def kernel_4bit_base(owner: nn.Module, base: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict):
    """The kernels' ``qlora.Base4bit`` of a bitsandbytes 4-bit ``base`` (owner: the layer holding it) where
    fastpeft's 4-bit kernels can compute ``base(x)`` (x alone, compute dtype x's, even K), else None."""
    from . import qlora

    if args or kwargs or not qlora.is_4bit(base):
        return None
    w = qlora.base_of(owner, base.weight)
    return w if w.quant is not None and w.compute_dtype in (None, x.dtype) else None


def linear_multi_lora(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], indices: torch.Tensor,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                      seg=None) -> torch.Tensor:
    """A new y (T, N) = x·Wᵀ + bias + each token's LoRA term (``multi_lora``'s): the kernels'
    ``multi_lora_linear`` (the terms and bias written first, cuBLAS's product added onto them); for the
    kernels only."""
    from .kernels.multi_lora import multi_lora_linear

    return multi_lora_linear(x, weight, bias, indices, lora_a, lora_b, scales, ranks, seg)


@torch.library.custom_op("fastpeft::multi_lora_linear_tma", mutates_args=())
def _multi_lora_linear_tma_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              indices: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                              ranks: torch.Tensor, order: Optional[torch.Tensor] = None,
                              starts: Optional[torch.Tensor] = None,
                              counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernels' ``multi_lora_linear_tma`` as one opaque op for torch.compile (``prefill_tma``'s
    batches, whose operands' alignment the trace could not see: ``multi_lora_linear`` where they are
    not its operands)."""
    from .kernels.multi_lora import multi_lora_linear, multi_lora_linear_tma, multi_lora_tma_ok

    route = multi_lora_linear_tma if multi_lora_tma_ok(x, weight) else multi_lora_linear
    return route(x, weight, bias, indices, lora_a, lora_b, scales, ranks, _seg_of(order, starts, counts))


@_multi_lora_linear_tma_op.register_fake
def _(x, weight, bias, indices, lora_a, lora_b, scales, ranks, order=None, starts=None, counts=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _seg_of(order: Optional[torch.Tensor], starts: Optional[torch.Tensor], counts: Optional[torch.Tensor]):
    """The kernels' Segments from a custom op's three tensors, or None (the op groups the tokens itself)."""
    if order is None:
        return None
    from .kernels.multi_lora import Segments

    return Segments(order, starts, counts)


@torch.library.custom_op("fastpeft::linear_multi_lora", mutates_args=())
def _linear_multi_lora_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], indices: torch.Tensor,
                          lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                          order: Optional[torch.Tensor] = None, starts: Optional[torch.Tensor] = None,
                          counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``linear_multi_lora`` as one opaque op for torch.compile; the tokens' grouping (order, starts,
    counts: the kernels' Segments) given, or worked out inside where it is not."""
    return linear_multi_lora(x, weight, bias, indices, lora_a, lora_b, scales, ranks, _seg_of(order, starts, counts))


@_linear_multi_lora_op.register_fake
def _(x, weight, bias, indices, lora_a, lora_b, scales, ranks, order=None, starts=None, counts=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fastpeft::multi_lora_wide", mutates_args=())
def _multi_lora_wide_op(x: torch.Tensor, w_wide: torch.Tensor, bias_wide: Optional[torch.Tensor], indices: torch.Tensor,
                        lora_b: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                        order: Optional[torch.Tensor] = None, starts: Optional[torch.Tensor] = None,
                        counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernels' ``multi_lora_wide`` as one opaque op for torch.compile: y_wide (T, N + S·R), the
    layer's output its first N columns."""
    from .kernels.multi_lora import multi_lora_wide

    return multi_lora_wide(x, w_wide, bias_wide, indices, lora_b, scales, ranks, _seg_of(order, starts, counts))


@_multi_lora_wide_op.register_fake
def _(x, w_wide, bias_wide, indices, lora_b, scales, ranks, order=None, starts=None, counts=None):
    return x.new_empty((x.shape[0], w_wide.shape[0]))


@torch.library.custom_op("fastpeft::multi_lora_", mutates_args=("y",))
def _multi_lora_op(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor, order: Optional[torch.Tensor] = None,
                   starts: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None) -> None:
    """``multi_lora`` into y in place as one opaque op for torch.compile (and the CUDA graphs of its
    "reduce-overhead" mode): the kernels' launchers stay out of the traced graph. The tokens' grouping
    (order, starts, counts) given, or worked out inside where it is not."""
    out = multi_lora(x, y, indices, lora_a, lora_b, scales, ranks, seg=_seg_of(order, starts, counts))
    if out is not y:
        y.copy_(out)


@_multi_lora_op.register_fake
def _(x, y, indices, lora_a, lora_b, scales, ranks, order=None, starts=None, counts=None) -> None:
    return None


def token_slots(row_slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each token's slot (T,) of a batch x (rows, ..., K) whose rows are ``row_slots``' rows, each
    repeated for its beams (rows a multiple of len(row_slots)) and for its tokens."""
    rows = len(x)
    if rows % len(row_slots):
        raise ValueError(f"MultiLora: the batch has {rows} rows but use() was given {len(row_slots)}")
    per_token = rows // len(row_slots) * (x.numel() // max(x.shape[-1], 1) // max(rows, 1))
    return row_slots.repeat_interleave(per_token) if per_token != 1 else row_slots


def _grouping(indices: torch.Tensor, num_slots: int, kernels: bool):
    """The kernels' ``segments(indices, num_slots)`` where they run, else None."""
    if not kernels:
        return None
    from .kernels.multi_lora import segments

    return segments(indices, num_slots)


_GROUPED: dict = {}  # (names, rows' names, x's leading shape, device, kernels) -> (indices, segments or None)
_GROUPED_MAX = 256


def _grouped(names: tuple, adapter_names, x: torch.Tensor, kernels: bool):
    """The tokens' slots (T,) of a mixed batch x whose rows name ``adapter_names`` over a layer holding
    the adapters ``names`` (slot i: names[i]; other names: -1), and their grouping where the kernels run;
    worked out once per distinct batch (one host-to-device copy, one grouping) and kept, so the layers
    and decode steps of one batch share them."""
    key = (names, tuple(adapter_names), x.shape[:-1], x.device, kernels)
    found = _GROUPED.get(key)
    if found is None:
        slot = {n: i for i, n in enumerate(names)}
        row_slots = torch.tensor([slot.get(n, -1) for n in adapter_names], dtype=torch.int32, device=x.device)
        indices = token_slots(row_slots, x)
        seg = _grouping(indices, len(names), kernels)
        if len(_GROUPED) >= _GROUPED_MAX:
            _GROUPED.clear()
        found = _GROUPED[key] = (indices, seg)
    return found


# --- PEFT's adapter_names on a patched model ------------------------------------------------------
_STACK_ATTR = "_fastpeft_stacked"  # on a LoRA layer: (key, A, B, scales, ranks)


def _stacked(layer, names: tuple, device, dtype):
    """The layer's adapters ``names`` as stacked (A (S, R, K), B (S, N, R), scales (S,), ranks (S,)),
    rebuilt only when one of their weights changed (a parameter's version or storage)."""
    params = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names]
    key = (names, dtype, tuple((a.data_ptr(), a._version, b.data_ptr(), b._version) for a, b in params),
           tuple(float(layer.scaling[n]) for n in names))
    cached = layer.__dict__.get(_STACK_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1:]
    R = max(a.shape[0] for a, _ in params)
    K, N = params[0][0].shape[1], params[0][1].shape[0]
    A = torch.zeros(len(names), R, K, device=device, dtype=dtype)
    B = torch.zeros(len(names), N, R, device=device, dtype=dtype)
    with torch.no_grad():
        for i, (a, b) in enumerate(params):
            A[i, :a.shape[0]] = a
            B[i, :, :a.shape[0]] = b
    scales = torch.tensor([float(layer.scaling[n]) for n in names], dtype=torch.float32, device=device)
    ranks = torch.tensor([a.shape[0] for a, _ in params], dtype=torch.int32, device=device)
    layer.__dict__[_STACK_ATTR] = (key, A, B, scales, ranks)
    return A, B, scales, ranks


def mixed_batch_forward(layer, x: torch.Tensor, adapter_names: Sequence[str], *args, **kwargs) -> torch.Tensor:
    """PEFT's ``_mixed_batch_forward`` of a LoRA layer (fastpeft's or PEFT's): the base output, plus
    each row's adapter (rows of "__base__" or of an adapter this layer lacks: nothing), all adapters of
    the batch in one ``multi_lora`` call."""
    if len(x) != len(adapter_names):
        raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(adapter_names)} and {len(x)} respectively.")
    batch = adapter_names if type(adapter_names) is _Batch else None
    part = None if batch is None else batch.layers.get(layer)
    if part is None:
        part = _layer_batch(layer, x, adapter_names)
        if batch is not None:
            batch.layers[layer] = part
    names, stacked, backend, is_4bit, launches = part
    base = layer.base_layer
    if not names:
        return base(x, *args, **kwargs)
    kernels = use_triton(x, backend)
    if batch is None:
        indices, seg = _grouped(names, adapter_names, x, kernels)
    else:  # the batch's own table: no key over every row's name
        key = (names, x.shape[:-1], x.device, kernels)
        grouped = batch.grouped.get(key)
        if grouped is None:
            grouped = batch.grouped[key] = _grouped(names, adapter_names, x, kernels)
        indices, seg = grouped
    return layer_forward(layer, base, x, args, kwargs, indices, seg, stacked, kernels, backend, read_4bit=is_4bit,
                         launches=None if batch is None else launches)


def _layer_batch(layer, x: torch.Tensor, adapter_names) -> tuple:
    """A LoRA layer's part of a mixed batch, PEFT's checks first: (the names of the rows' adapters it
    holds, sorted; those adapters stacked (``_stacked``) or None; the layer's backend; whether its base
    is 4-bit; a one-item list for ``layer_forward``'s kept launches)."""
    from . import options, qlora

    if layer.merged:
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                         "`unmerge_adapter` first.")
    if any(getattr(layer, "use_dora", {}).get(n, False) for n in set(adapter_names) if n != BASE):
        raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
    names = tuple(sorted(n for n in set(adapter_names) if n in layer.lora_A))
    stacked = _stacked(layer, names, x.device, layer.lora_A[names[0]].weight.dtype) if names else None
    return names, stacked, options.of(layer).backend, qlora.is_4bit(layer.base_layer), [None]


def layer_forward(owner: nn.Module, base: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict,
                  indices: torch.Tensor, seg, lora: tuple, kernels: bool, backend=None,
                  read_4bit: bool = True, launches: Optional[list] = None) -> torch.Tensor:
    """``base(x, *args, **kwargs)`` plus each token's LoRA term (``multi_lora``; lora = (A, B, scales,
    ranks) stacked, indices (T,) the tokens' slots, seg their grouping or None), by the route the base
    allows: the base product and the terms in one route (``multi_lora_linear``, ``fusable``); a 4-bit
    base by fastpeft's 4-bit kernels where they read it (``read_4bit``: the caller has not ruled it
    out), then the terms in place; else the base layer's own forward, then the terms in place.
    ``owner``: the layer holding ``base`` (it keeps the 4-bit weight's kernel form). ``launches``: a
    one-item list the caller keeps across forwards, where the kernels' launches of the fused and
    in-place routes are kept (``_kept_forward``), or None."""
    if launches is not None and kernels and seg is not None and not args and not kwargs:
        y, launches[0] = _kept_forward(launches[0], base, x, indices, seg, lora, read_4bit)
        if y is not None:
            return y
    x2 = x.reshape(-1, x.shape[-1])
    if kernels and fusable(base, x, args, kwargs):
        y2 = linear_multi_lora(x2, base.weight, base.bias, indices, *lora, seg=seg)
        return y2.reshape(*x.shape[:-1], y2.shape[-1])
    w4 = kernel_4bit_base(owner, base, x, args, kwargs) if kernels and read_4bit else None
    if w4 is not None:  # the 4-bit base by fastpeft's kernels, not bitsandbytes' forward
        from . import qlora

        y2 = multi_lora(x2, qlora.linear_4bit(x2, w4, base.bias), indices, *lora, backend, seg=seg)
        return y2.reshape(*x.shape[:-1], y2.shape[-1])
    y = base(x, *args, **kwargs)
    return multi_lora(x2, y.reshape(-1, y.shape[-1]), indices, *lora, backend, seg=seg).reshape(y.shape)


def _kept_forward(kept, base: nn.Module, x: torch.Tensor, indices: torch.Tensor, seg, lora: tuple, is_4bit: bool):
    """``layer_forward``'s fused or in-place route for the kernels, ``base(x)`` plus the LoRA terms,
    with the kernels' launches ``kept`` from the layer's last forward (the previous decode step) where
    its key is the same: x's shape, strides, dtype and device, the output's or the weight's, fp32
    precision, and the same objects for the grouping, the stacked adapters and the weight and bias.
    Saves building the launchers' keys (tens of values) per layer and step: eager decode's host time.
    Returns (y, kept), the caller keeping ``kept`` (None at first); y None where ``is_4bit`` (a 4-bit
    base the kernels read: ``layer_forward``'s 4-bit route)."""
    fused = fusable(base, x, (), {})
    if not fused and is_4bit:
        return None, kept
    x2 = x.reshape(-1, x.shape[-1])
    if fused:
        params = base._parameters
        w, bias = params["weight"], params["bias"]
        key = (True, x2.shape, x2.stride(), x.dtype, x.device, w.shape, w.stride(), w.device, fp32_precision())
        objects = (seg, w, bias, *lora)
    else:
        y = base(x)
        y2 = y.reshape(-1, y.shape[-1])
        key = (False, x2.shape, x2.stride(), x.dtype, x.device, y2.shape, y2.stride(), y2.dtype, y2.device,
               fp32_precision())
        objects = (seg, *lora)
    if kept is None or kept[0] != key or not all(map(operator.is_, kept[1], objects)):
        from .kernels import multi_lora as kernels

        run = (kernels.multi_lora_linear_plan(x2, w, bias, indices, *lora, seg) if fused
               else kernels.multi_lora_plan(x2, y2, indices, *lora, seg))
        kept = (key, objects, run)
    if fused:
        y2 = kept[2](x2, w, bias, *lora, seg)
        return y2.reshape(*x.shape[:-1], y2.shape[-1]), kept
    kept[2](x2, y2, *lora, seg)
    return y, kept


def _check_names(model: nn.Module, adapter_names) -> list:
    """PEFT's checks of ``adapter_names`` on a model: a list of str, not in training mode, each (but
    "__base__") an adapter of some LoRA layer."""
    from .model_state import lora_layers

    if not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    expected = set()
    for _, layer in lora_layers(model):
        expected |= set(layer.lora_A.keys())
    unexpected = {n for n in adapter_names if n != BASE} - expected
    if unexpected:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
    return list(adapter_names)


class _Batch(list):
    """The rows' adapter names that ``mixed_batch`` hands to every LoRA layer (a list, as PEFT's
    ``adapter_names``), with what the layers work out from them on their first forward inside the block
    kept for the later ones (the decode steps): each layer's checks and stacked adapters
    (``_layer_batch``; adapter weights do not change inside one forward or generate), the tokens'
    grouping per shape, and each layer's kernel launches (``layer_forward``'s ``launches``)."""

    def __init__(self, names):
        super().__init__(names)
        self.layers: dict = {}   # LoRA layer -> _layer_batch's tuple
        self.checked: dict = {}  # PEFT layer -> whether fastpeft computes its mixed batch (peft_bridge)
        self.grouped: dict = {}  # (names, x's leading shape, device, kernels) -> (indices, segments)


def _inject(names):
    def hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs
    return hook


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names, num_beams: Optional[int] = None):
    """Within the block, every LoRA layer of ``model`` runs each row with its own adapter (PEFT's
    ``adapter_names``); with ``num_beams`` > 1 each name is repeated for its row's beams, except in an
    encoder (which sees the original rows), as PEFT does."""
    from .model_state import lora_layers

    original = names = _Batch(_check_names(model, adapter_names))
    if isinstance(num_beams, int) and num_beams > 1:
        names = _Batch([n for n in original for _ in range(num_beams)])
    handles = []
    encoder = getattr(model, "get_encoder", None)
    encoder = encoder() if callable(encoder) and getattr(model.config, "is_encoder_decoder", False) else None
    encoder_layers = {id(m) for m in encoder.modules()} if encoder is not None else set()
    try:
        for _, layer in lora_layers(model):
            rows = original if id(layer) in encoder_layers else names
            handles.append(layer.register_forward_pre_hook(_inject(rows), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- the serving wrapper ------------------------------------------------------------------------------
class _Rows:
    """The slots of the batch's rows (a device tensor (B,)), set by ``MultiLora.use`` for the model's
    forwards, and where the kernels run their grouping ``seg`` (the kernels' Segments of ``slots``),
    worked out once by ``use``: a batch's tokens at any length are grouped from it
    (``repeat_segments``), with no sort. ``grouped`` keeps, per (rows, tokens per row) of the eager
    forwards inside one ``use``, the tokens' slots and their segments: worked out by the first layer,
    reused by every other layer and by every decode step of the same shape. A plain object (instance
    attributes, no thread-local storage), so that torch.compile reads ``slots`` and ``seg`` as graph
    inputs."""

    def __init__(self):
        self.slots: Optional[torch.Tensor] = None
        self.seg = None
        self.grouped: Optional[dict] = None
        self.version = 0  # counts the adapters' loads and unloads (what _Siblings' kept outputs were made with)

    def token_segments(self, indices: torch.Tensor, num_slots: int):
        """The kernels' segments of the tokens ``indices`` (``token_slots(slots, x)``) over ``num_slots``:
        from the rows' grouping where ``use`` worked it out, else by ``segments``."""
        if self.seg is not None and self.seg.counts.shape[0] == num_slots:
            from .kernels.multi_lora import repeat_segments

            return repeat_segments(self.seg, len(indices) // len(self.slots))
        return _grouping(indices, num_slots, True)

    def tokens(self, x: torch.Tensor, num_slots: int, kernels: bool):
        """(indices (T,), segments or None) of a batch x (rows, ..., K) over ``slots``' rows
        (``token_slots``); the segments (over ``num_slots``) only where the kernels run."""
        key = (x.shape[:-1], num_slots, kernels)
        found = None if self.grouped is None else self.grouped.get(key)
        if found is None:
            indices = token_slots(self.slots, x)
            found = (indices, self.token_segments(indices, num_slots) if kernels else None)
            if self.grouped is not None:
                self.grouped[key] = found
        return found


# A layer is wide (``MultiLoraLinear._widen``: the slots' A below the weight in one buffer, so the base
# product computes every slot's x·Aᵀ and no shrink runs) where the slots' A take at most this many bytes:
# the product then reads them all, for every batch, where the shrink reads the slots the batch uses, and
# pays for r_max, where the shrink stops at each slot's rank. The bound keeps the larger stacks on the
# shrink, whose cost follows the slots' real ranks, though wide layers measured faster beyond it
# (docs/performance.md, "Multi-LoRA serving"). FASTPEFT_MULTI_LORA_WIDE=1 makes every plain layer wide.
WIDE_MAX_BYTES = 8 << 20


def widens(base_layer: nn.Module, slots: int, max_rank: int, dtype: torch.dtype) -> bool:
    """Whether a ``MultiLoraLinear`` over ``base_layer`` is wide: a plain ``nn.Linear`` whose weight is
    in the adapters' dtype, a half type or fp32, the slots' A within WIDE_MAX_BYTES; the switch
    FASTPEFT_MULTI_LORA_WIDE (kernels/tuning.py) pins it on (1) or off (0) where the layer allows it."""
    w = base_layer._parameters.get("weight") if type(base_layer) is nn.Linear else None
    if w is None or w.dtype != dtype or dtype not in _FUSED_DTYPES:
        return False
    pinned = tuning.pinned(tuning.MULTI_LORA_WIDE)
    if pinned is not None:
        return pinned
    return slots * max_rank * w.shape[1] * w.element_size() <= WIDE_MAX_BYTES


def _shared_tensors(model: nn.Module) -> set:
    """ids of the parameters that a model holds under more than one name (tied weights)."""
    seen, shared = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared


def _kernels_read_4bit(base_layer: nn.Module) -> bool:
    """Whether ``base_layer`` is a bitsandbytes 4-bit layer that fastpeft's 4-bit kernels read."""
    from . import qlora

    if not qlora.is_4bit(base_layer):
        return False
    try:
        qlora.check_4bit("", base_layer)
    except (ValueError, NotImplementedError):
        return False
    return True


class MultiLoraLinear(nn.Module):
    """A frozen linear (``nn.Linear``, bitsandbytes ``Linear4bit`` or transformers' ``Conv1D``) plus
    ``slots`` adapter slots: A (slots, max_rank, in), B (slots, out, max_rank), scaling and rank per
    slot (rank 0: empty, or an adapter that does not target this layer). The rows' slots come from the
    owning ``MultiLora``."""

    def __init__(self, base_layer: nn.Module, slots: int, max_rank: int, rows: _Rows, dtype: torch.dtype,
                 wide: bool = False):
        super().__init__()
        self.base_layer = base_layer
        from .layer import is_conv1d

        # transformers' Conv1D (GPT-2) stores its weight (in, out) and has no in_features: its own forward runs
        K, N = base_layer.weight.shape if is_conv1d(base_layer) else (base_layer.in_features, base_layer.out_features)
        self.in_features, self.out_features = K, N
        device = next(base_layer.parameters()).device
        self.register_buffer("lora_A", torch.zeros(slots, max_rank, K, device=device, dtype=dtype))
        self.register_buffer("lora_B", torch.zeros(slots, N, max_rank, device=device, dtype=dtype))
        self.register_buffer("scales", torch.zeros(slots, dtype=torch.float32, device=device))
        self.register_buffer("ranks", torch.zeros(slots, dtype=torch.int32, device=device))
        self._rows = rows
        self._is_4bit = _kernels_read_4bit(base_layer)
        self._launches = [None]  # the kernels' launches of the last forward (layer_forward's, kept)
        self._wide = None  # (w_wide, bias_wide, weight, bias, lora_A, ...) where the layer is wide (``_widen``)
        self._siblings = None  # (its _Siblings, its index there) where MultiLora groups it with its siblings
        if wide:
            self._widen()

    def _widen(self, w_wide: Optional[torch.Tensor] = None, b_wide: Optional[torch.Tensor] = None) -> None:
        """Move the base weight (and bias) and the slots' A into one buffer, A's S·R rows below the
        weight's N (``multi_lora_wide``); the base layer's parameters and ``lora_A`` become views of it
        (no copy kept). ``close`` undoes it (``_narrow``). w_wide (N + S·R, K) and b_wide (N + S·R,):
        the buffers to use (slices of a sibling group's, ``_Siblings``), where not new ones; b_wide is
        taken where the layer has a bias."""
        base, A = self.base_layer, self._buffers["lora_A"]
        w, b = base.weight, base.bias
        (N, K), (S, R, _) = w.shape, A.shape
        if w_wide is None:
            w_wide = torch.empty(N + S * R, K, device=w.device, dtype=w.dtype)
        w_wide[:N].copy_(w.detach())
        w_wide[N:].copy_(A.reshape(S * R, K))
        w_param = base.weight = nn.Parameter(w_wide[:N], requires_grad=w.requires_grad)
        b_param = None
        if b is None:
            b_wide = None
        else:
            if b_wide is None:
                b_wide = torch.zeros(N + S * R, device=b.device, dtype=b.dtype)
            b_wide[:N].copy_(b.detach())
            b_param = base.bias = nn.Parameter(b_wide[:N], requires_grad=b.requires_grad)
        A = self._buffers["lora_A"] = w_wide[N:].view(S, R, K)
        # what _wide_now checks per forward: the objects, and where their data is
        self._wide = (w_wide, b_wide, w_param, b_param, A, w_wide.data_ptr(), A.data_ptr(),
                      None if b_wide is None else b_wide.data_ptr())

    def _narrow(self) -> None:
        """The base layer's weight and bias, and ``lora_A``, as tensors of their own (``_widen`` undone)."""
        if self._wide is None:
            return
        base = self.base_layer
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=base.weight.requires_grad)
        if base.bias is not None:
            base.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=base.bias.requires_grad)
        self._buffers["lora_A"] = self._buffers["lora_A"].clone()
        self._wide = None

    def _wide_now(self):
        """(w_wide, bias_wide, ...) where the layer is wide and its buffer still holds the base layer's
        parameters and ``lora_A``; widened again where one of them was replaced (a new Parameter, its
        ``.data`` set); None where the layer is not wide."""
        wide = self._wide
        if wide is None or torch.compiler.is_compiling():
            return wide
        params, A = self._modules["base_layer"]._parameters, self._buffers["lora_A"]
        w, b = params["weight"], params.get("bias")
        if (w is wide[2] and b is wide[3] and A is wide[4] and w.data_ptr() == wide[5] and A.data_ptr() == wide[6]
                and (b is None or b.data_ptr() == wide[7])):
            return wide
        self._wide = None
        if widens(self.base_layer, *A.shape[:2], A.dtype):
            self._widen()
        else:
            self._buffers["lora_A"] = A.clone()
        return self._wide

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``.to``, ``.half``, ...), which gives the views of a wide layer's buffer
        tensors of their own; the layer is widened again after it where it still can be."""
        wide, self._wide = self._wide, None
        out = super()._apply(fn, recurse)
        if wide is not None and widens(self.base_layer, *self.lora_A.shape[:2], self.lora_A.dtype):
            self._widen()
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        slots = self._rows.slots
        base = self._modules["base_layer"]
        if slots is None:
            return base(x, *args, **kwargs)
        siblings = self._siblings
        if siblings is not None and not args and not kwargs and not torch.compiler.is_compiling():
            # computed with a sibling's call of this forward
            y = siblings[0].take(siblings[1], x)
            if y is not None:
                return y
        kernels = use_triton(x)
        tma = kernels and prefill_tma(base, x, args, kwargs)
        wide = (self._wide_now() if kernels and not tma and self._wide is not None and plain(base, x, args, kwargs)
                else None)
        buffers = self._buffers  # not through nn.Module.__getattr__: this runs per layer and decode step
        lora = (buffers["lora_A"], buffers["lora_B"], buffers["scales"], buffers["ranks"])
        if torch.compiler.is_compiling():
            # traced: the tokens' slots and grouping as torch ops (none for one token per row: the rows'
            # own), the kernels in one custom op
            x2 = x.reshape(-1, x.shape[-1])
            indices = token_slots(slots, x)
            seg = tuple(self._rows.token_segments(indices, lora[3].shape[0])) if kernels else ()
            if tma:
                y2 = torch.ops.fastpeft.multi_lora_linear_tma(x2, base.weight, base.bias, indices, *lora, *seg)
                return y2.reshape(*x.shape[:-1], y2.shape[-1])
            if wide is not None:
                y2 = torch.ops.fastpeft.multi_lora_wide(x2, *wide[:2], indices, *lora[1:], *seg)
                return y2[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)
            if kernels and fusable(base, x, args, kwargs):
                y2 = torch.ops.fastpeft.linear_multi_lora(x2, base.weight, base.bias, indices, *lora, *seg)
                return y2.reshape(*x.shape[:-1], y2.shape[-1])
            y = base(x, *args, **kwargs)
            torch.ops.fastpeft.multi_lora_(x2, y.reshape(-1, y.shape[-1]), indices, *lora, *seg)
            return y
        indices, seg = self._rows.tokens(x, lora[3].shape[0], kernels)
        if tma:  # a prefill batch: its launches worked out per call (the key lookup is small beside it)
            from .kernels.multi_lora import multi_lora_linear_tma

            x2 = x.reshape(-1, x.shape[-1])
            y2 = multi_lora_linear_tma(x2, base.weight, base.bias, indices, *lora, seg)
            return y2.reshape(*x.shape[:-1], y2.shape[-1])
        if wide is not None:
            if siblings is not None:  # the group's product and expand, where it still holds together
                y = siblings[0].run(siblings[1], x, indices, seg)
                if y is not None:
                    return y
            return self._wide_forward(x, indices, seg, wide, lora)
        return layer_forward(self, base, x, args, kwargs, indices, seg, lora, kernels, read_4bit=self._is_4bit,
                             launches=self._launches)

    def _wide_forward(self, x: torch.Tensor, indices: torch.Tensor, seg, wide: tuple, lora: tuple) -> torch.Tensor:
        """The wide layer's forward by the kernels (``multi_lora_wide``), its launches kept across
        forwards of the same x shape, strides, dtype and grouping (``_kept_forward``'s reason), and the
        output returned as one view of the wide product (its first N columns in x's leading shape)."""
        key = (x.shape, x.stride(), x.dtype, x.device, fp32_precision())
        kept = self._launches[0]
        if kept is None or kept[0] != key or kept[1] is not seg:  # seg: the kernels' grouping, never None here
            from .kernels.multi_lora import multi_lora_wide_plan

            x2 = x.reshape(-1, x.shape[-1])
            view = _strided_view(x.shape[:-1], wide[0].shape[0], self.out_features, 0)  # rows N + S·R apart
            kept = self._launches[0] = (key, seg, multi_lora_wide_plan(x2, *wide[:2], indices, *lora[1:], seg), view)
        y = kept[2](x, *wide[:2], *lora[1:], seg)  # x as it is: F.linear's output has the 2-D one's memory
        return y.as_strided(*kept[3])

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as PEFT's LoRA layers give it (models read a projection's weight,
        e.g. T5's feed-forward its dtype)."""
        return self._modules["base_layer"].weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's bias (see ``weight``)."""
        return self._modules["base_layer"].bias

    def extra_repr(self) -> str:
        S, R, _ = self.lora_A.shape
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={S}, max_rank={R}"


def _strided_view(lead: tuple, width: int, columns: int, offset: int) -> tuple:
    """as_strided's (size, stride, storage offset) of ``columns`` columns from ``offset`` of a
    contiguous (*lead, width) tensor."""
    strides = [1] * len(lead)
    for i in range(len(lead) - 2, -1, -1):
        strides[i] = strides[i + 1] * lead[i + 1]
    return (*lead, columns), (*(s * width for s in strides), 1), offset


class _Siblings:
    """Wide ``MultiLoraLinear`` layers that one module calls on one input, in call order
    (``models.SIBLING_PROJECTIONS``: q, k, v; gate, up), whose wide buffers lie end to end in one
    (each layer's [W; A] a slice of it; their B side by side in one (S, ΣN, R) buffer, their ranks and
    scales rows of one (G, S) each), so that ``multi_lora_wide_group`` computes them all in one product
    and one expand. In an eager forward the first of them called on an input runs the group and
    returns its own output; each other one takes its output on its call for the very same tensor,
    unmodified (identity and version counter), with the same rows' slots and loaded adapters. Any
    other call, and every call under torch.compile, runs the layer alone (its own wide route over its
    slice). What a layer's weights were replaced by (``.to()``, a new Parameter) is grouped again at
    the next call, or, where the layers can no longer be, the group stops. It also stops once
    MISSES_MAX of its computed outputs went unused (a module that calls the layers on different inputs,
    as cross-attention does: the group would compute them twice)."""

    MISSES_MAX = 2

    def __init__(self, layers: Sequence[MultiLoraLinear], rows: _Rows):
        self.layers = tuple(layers)
        self.rows = rows
        self.misses = 0  # outputs computed and dropped unused
        self.pending = None  # (x, its version, rows' slots, adapters' version, {index: output})
        self.launches = None  # the group's kernel launches, kept: (key, seg, run, views)
        self.parts = None  # what run() checks per call: each layer's _wide tuple, B, ranks, scales
        if not self._form():
            self.stop()

    @staticmethod
    def groupable(layers) -> bool:
        """Whether ``layers`` can share one group: all wide, one K, dtype, device and slot shape."""
        first = layers[0]
        return all(layer._wide is not None and layer.lora_A.shape == first.lora_A.shape
                   and layer.lora_A.dtype == first.lora_A.dtype
                   and layer.lora_B.dtype == first.lora_B.dtype and layer.lora_A.device == first.lora_A.device
                   for layer in layers)

    def _form(self) -> bool:
        """Lay the layers' buffers end to end (copies; the layers' tensors become views of the group's);
        False where they cannot be grouped (the caller then stops the group)."""
        self.pending = self.launches = None
        layers = self.layers
        if not self.groupable(layers):
            return False
        S, R, K = layers[0].lora_A.shape
        widths = tuple(layer.out_features for layer in layers)
        rows = sum(widths) + len(layers) * S * R
        first = layers[0]
        w0 = first._wide[0]
        w_group = torch.empty(rows, K, device=w0.device, dtype=w0.dtype)
        has_bias = any(layer._wide[1] is not None for layer in layers)
        b_group = torch.zeros(rows, device=w0.device, dtype=w0.dtype) if has_bias else None
        B = torch.empty(S, sum(widths), R, device=w0.device, dtype=first.lora_B.dtype)
        ranks = torch.empty(len(layers), S, device=w0.device, dtype=first.ranks.dtype)
        scales = torch.empty(len(layers), S, device=w0.device, dtype=first.scales.dtype)
        row = col = 0
        for g, (layer, n) in enumerate(zip(layers, widths)):
            width = n + S * R
            layer._widen(w_group[row:row + width], None if b_group is None else b_group[row:row + width])
            buffers = layer._buffers
            B[:, col:col + n].copy_(buffers["lora_B"])
            ranks[g].copy_(buffers["ranks"])
            scales[g].copy_(buffers["scales"])
            buffers["lora_B"], buffers["ranks"], buffers["scales"] = B[:, col:col + n], ranks[g], scales[g]
            row, col = row + width, col + n
        self.group = (w_group, b_group, B, scales, ranks, widths)
        self.parts = tuple((layer._wide, layer._buffers["lora_B"], layer._buffers["ranks"], layer._buffers["scales"])
                           for layer in layers)
        for index, layer in enumerate(layers):
            layer._siblings = (self, index)
        return True

    def _intact(self) -> bool:
        """Whether every layer still runs on the group's buffers (``_wide_now`` also re-widens a layer
        whose weights were replaced, which leaves the group)."""
        for layer, (wide, B, ranks, scales) in zip(self.layers, self.parts):
            buffers = layer._buffers
            if (layer._wide_now() is not wide or buffers["lora_B"] is not B or buffers["ranks"] is not ranks
                    or buffers["scales"] is not scales):
                return False
        return True

    def stop(self) -> None:
        """Leave the layers to run alone (their tensors stay views of the group's buffers)."""
        self.pending = self.launches = self.parts = None
        for layer in self.layers:
            layer._siblings = None

    def take(self, index: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Layer ``index``'s output for x where the group computed it on a sibling's call of this
        forward (the same x, unmodified, the same rows' slots and adapters), else None."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if (pending[0] is not x or pending[1] != x._version or pending[2] is not self.rows.slots
                or pending[3] != self.rows.version or index not in pending[4]):
            self.drop(pending)
            return None
        outputs = pending[4]
        y = outputs.pop(index)
        if outputs:
            self.pending = pending
        return y

    def drop(self, pending) -> None:
        """Count kept outputs that went unused (``pending``, a group's); stop the group at MISSES_MAX."""
        if pending is not None and pending[4]:
            self.misses += 1
            if self.misses >= self.MISSES_MAX:
                self.stop()

    def run(self, index: int, x: torch.Tensor, indices: torch.Tensor, seg) -> Optional[torch.Tensor]:
        """Every layer's output for x (one product, one expand: ``multi_lora_wide_group``): layer
        ``index``'s returned, the others' kept for their calls (``take``); None where the group does
        not hold (its layers then run alone)."""
        if self.parts is None:  # stopped
            return None
        if not self._intact() and not self._form():
            self.stop()
            return None
        if not all(plain(layer._modules["base_layer"], x, (), {}) for layer in self.layers):
            return None
        key = (x.shape, x.stride(), x.dtype, x.device, fp32_precision())
        kept = self.launches
        if kept is None or kept[0] != key or kept[1] is not seg:
            from .kernels.multi_lora import multi_lora_wide_group_plan

            w_group, b_group, B, scales, ranks, widths = self.group
            run = multi_lora_wide_group_plan(x.reshape(-1, x.shape[-1]), w_group, b_group, indices, B, scales, ranks,
                                             widths, seg)
            S, R = B.shape[0], B.shape[2]
            total, lead, views, offset = w_group.shape[0], x.shape[:-1], [], 0
            for n in widths:
                views.append(_strided_view(lead, total, n, offset))
                offset += n + S * R
            kept = self.launches = (key, seg, run, views)
        w_group, b_group, B, scales, ranks, _ = self.group
        y = kept[2](x, w_group, b_group, B, scales, ranks, seg)
        outputs = {g: y.as_strided(*view) for g, view in enumerate(kept[3]) if g != index}
        self.pending = (x, x._version, self.rows.slots, self.rows.version, outputs)
        return y.as_strided(*kept[3][index])


class MultiLora:
    """Serve many LoRA adapters over one base model, one adapter per batch row.

        ml = fastpeft.MultiLora(model, max_adapters=8, max_rank=16, target_modules=["q_proj", "v_proj"])
        ml.load_adapter("sql", "adapters/sql")           # a PEFT-format directory, or its state dict
        with ml.use(["sql", None, "chat", "sql"]):       # each row's adapter; None: the base model
            out = model.generate(input_ids, max_new_tokens=32)

    ``target_modules``: names (suffixes, as PEFT matches them) or "all-linear"; the targeted layers are
    replaced by ``MultiLoraLinear`` in place (``close()`` puts them back). Adapters may target any
    subset of them with any rank up to ``max_rank``; a slot freed by ``unload_adapter`` is reused.
    Loading or unloading while an eager forward runs is refused.

    Within one ``use`` block the tokens' slots are grouped (sorted by slot) once per batch shape and
    shared by every layer and every decode step; the rows are grouped (sorted by slot) once per ``use``,
    and a batch's tokens grouped from that, with no sort. Under torch.compile
    (``generate(..., cache_implementation="static")`` compiles the decode step with CUDA graphs) each
    layer's kernels are one custom op, ``fastpeft::multi_lora_`` (``fastpeft::multi_lora_wide`` for a
    wide layer), given the grouping (at one token per row, the rows' own: no op per layer); a compiled
    forward is not counted as running.

    A plain ``nn.Linear`` layer whose slots' A take at most WIDE_MAX_BYTES is wide: its weight (and
    bias) and the slots' A share one buffer, A's rows below the weight's, and the layer's parameters
    are views of it (no copy; ``close()`` gives them tensors of their own again). One cuBLAS product
    then yields the base output and every slot's x·Aᵀ, and the expand adds each token's own: no shrink
    kernel (``kernels.multi_lora.multi_lora_wide``). Tied weights are left as they are.

    Wide layers that one module calls on one input (q, k and v; gate and up:
    ``models.SIBLING_PROJECTIONS``) share one such buffer, end to end (``_Siblings``): in an eager
    forward the first of them runs all of them as one product and one expand
    (``kernels.multi_lora.multi_lora_wide_group``), the others take their outputs on their calls
    (for the very same input tensor only). FASTPEFT_MULTI_LORA_GROUP=0 keeps them apart.
    """

    def __init__(self, model: nn.Module, max_adapters: int, max_rank: int, target_modules="all-linear",
                 dtype: Optional[torch.dtype] = None):
        from .config import LoraConfig
        from .targets import plan_patch

        if max_adapters < 1 or max_rank < 1:
            raise ValueError(f"MultiLora: max_adapters and max_rank must be >= 1, got {max_adapters}, {max_rank}")
        self.model, self.max_adapters, self.max_rank = model, max_adapters, max_rank
        self._rows = _Rows()
        self._slots: dict[str, int] = {}
        self._busy, self._lock = 0, threading.Lock()  # forwards running, in any thread
        with warnings.catch_warnings():  # PEFT's fan_in_fan_out warnings: the layers' own product runs Conv1D
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
            plan = plan_patch(model, LoraConfig(target_modules=target_modules), adapter_name="multi_lora")
        names = [t.name for t in plan.targets]
        self.layers: dict[str, MultiLoraLinear] = {}
        shared = _shared_tensors(model)
        for name in names:
            base = model.get_submodule(name)
            w = base.weight
            layer_dtype = dtype or (w.dtype if w.dtype.is_floating_point else
                                    (getattr(base, "compute_dtype", None) or torch.float32))
            wide = widens(base, max_adapters, max_rank, layer_dtype) and not shared & {id(w), id(base.bias)}
            layer = MultiLoraLinear(base, max_adapters, max_rank, self._rows, layer_dtype, wide)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            self.layers[name] = layer
        self._siblings = self._group_siblings() if tuning.pinned(tuning.MULTI_LORA_GROUP) is not False else []
        self._hooks = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._exit,
                                                                                                 always_call=True)]

    def _group_siblings(self) -> list:
        """A ``_Siblings`` for each module's wide layers of one input (``models.SIBLING_PROJECTIONS``; two
        or more of a group served: q and v where k is not)."""
        from .models import SIBLING_PROJECTIONS

        served = {id(layer) for layer in self.layers.values()}
        groups = []
        for module in self.model.modules():
            for names in SIBLING_PROJECTIONS:
                layers = [layer for layer in map(module._modules.get, names) if id(layer) in served]
                if len(layers) > 1 and _Siblings.groupable(layers):
                    groups.append(_Siblings(layers, self._rows))
        return groups

    def _enter(self, module, args):
        if torch.compiler.is_compiling():  # a compiled forward is not counted (see use())
            return
        with self._lock:
            self._busy += 1

    def _exit(self, module, args, output):
        if torch.compiler.is_compiling():
            return
        for group in self._siblings:  # no output kept past the forward that made it
            pending, group.pending = group.pending, None
            group.drop(pending)
        with self._lock:
            self._busy -= 1

    def adapters(self) -> list[str]:
        """The loaded adapters' names, by slot."""
        return sorted(self._slots, key=self._slots.get)

    def _refuse_if_running(self, what: str) -> None:
        if self._busy:
            raise RuntimeError(f"MultiLora: cannot {what} while a forward runs")

    def load_adapter(self, name: str, adapter) -> int:
        """Load a PEFT-format adapter (a directory with adapter_config.json and adapter_model.safetensors
        or .bin, or a (state_dict, config dict) pair) into a free slot; returns the slot. Checked whole
        before anything is written: an error leaves the loaded set as it was. A forward that starts
        meanwhile waits for the load to finish."""
        state, config = _read_adapter(adapter)
        with self._lock:
            self._refuse_if_running("load an adapter")
            return self._load(name, state, config)

    def _load(self, name: str, state: dict, config: dict) -> int:
        if name in self._slots:
            raise ValueError(f"MultiLora: an adapter named {name!r} is already loaded (unload_adapter it first)")
        free = sorted(set(range(self.max_adapters)) - set(self._slots.values()))
        if not free:
            raise RuntimeError(f"MultiLora: all {self.max_adapters} slots are in use ({', '.join(self.adapters())}); "
                               f"unload_adapter one first")
        writes = self._plan_writes(name, state, config)
        slot = free[0]
        with torch.no_grad():
            for layer in self.layers.values():
                layer.ranks[slot] = 0
                layer.scales[slot] = 0.0
            for layer, a, b, scale in writes:
                r = a.shape[0]
                layer.lora_A[slot].zero_()
                layer.lora_B[slot].zero_()
                layer.lora_A[slot, :r] = a.to(layer.lora_A.dtype)
                layer.lora_B[slot, :, :r] = b.to(layer.lora_B.dtype)
                layer.scales[slot] = scale
                layer.ranks[slot] = r
        self._slots[name] = slot
        self._rows.version += 1
        return slot

    def _plan_writes(self, name: str, state: dict, config: dict) -> list:
        r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora", False))
        if config.get("use_dora"):
            raise NotImplementedError(f"MultiLora: adapter {name!r} uses DoRA, which is not supported")
        pairs: dict[str, dict] = {}
        for key, tensor in state.items():
            found = _LORA_KEY.match(key)
            if found is None:
                raise NotImplementedError(f"MultiLora: adapter {name!r} has {key!r}; only lora_A / lora_B weights "
                                          f"are served")
            pairs.setdefault(found.group(1), {})[found.group(2)] = tensor
        writes = []
        for module, parts in sorted(pairs.items()):
            layer = self._layer_for(module)
            if layer is None:
                raise ValueError(f"MultiLora: adapter {name!r} targets {module!r}, which is not one of the served "
                                 f"layers ({len(self.layers)}: target_modules of MultiLora)")
            if set(parts) != {"lora_A", "lora_B"}:
                raise ValueError(f"MultiLora: adapter {name!r} lacks {({'lora_A', 'lora_B'} - set(parts)).pop()} "
                                 f"for {module!r}")
            a, b = parts["lora_A"], parts["lora_B"]
            r = a.shape[0]
            if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
                raise ValueError(f"MultiLora: adapter {name!r} at {module!r}: lora_A {tuple(a.shape)} and lora_B "
                                 f"{tuple(b.shape)} do not fit ({layer.out_features}, {layer.in_features})")
            if r > self.max_rank:
                raise ValueError(f"MultiLora: adapter {name!r} has rank {r} at {module!r}, above max_rank="
                                 f"{self.max_rank}")
            pattern_r = _pattern(rank_pattern, module, r_default)
            alpha = _pattern(alpha_pattern, module, alpha_default)
            if pattern_r != r:
                raise ValueError(f"MultiLora: adapter {name!r} at {module!r} has rank {r}, its config says {pattern_r}")
            writes.append((layer, a, b, reference.lora_scaling(r, alpha, rslora)))
        if not writes:
            raise ValueError(f"MultiLora: adapter {name!r} has no lora_A / lora_B weights")
        return writes

    def _layer_for(self, module: str):
        module = module.removeprefix("base_model.model.")
        if module in self.layers:
            return self.layers[module]
        matches = [n for n in self.layers if n.endswith("." + module) or module.endswith("." + n)]
        return self.layers[matches[0]] if len(matches) == 1 else None

    def unload_adapter(self, name: str) -> None:
        """Free ``name``'s slot (its weights zeroed; the slot is reused by the next load)."""
        with self._lock:
            self._refuse_if_running("unload an adapter")
            if name not in self._slots:
                raise KeyError(f"MultiLora: no adapter named {name!r}; loaded: {self.adapters()}")
            slot = self._slots.pop(name)
            with torch.no_grad():
                for layer in self.layers.values():
                    layer.ranks[slot] = 0
                    layer.scales[slot] = 0.0
                    layer.lora_A[slot].zero_()
                    layer.lora_B[slot].zero_()
            self._rows.version += 1

    @contextlib.contextmanager
    def use(self, adapters: Sequence[Optional[str]]):
        """Within the block, batch row i runs with adapter ``adapters[i]`` (None or "__base__": the base
        model); generate's beams or return sequences repeat each row's adapter."""
        unknown = sorted({a for a in adapters if a is not None and a != BASE} - set(self._slots))
        if unknown:
            raise ValueError(f"MultiLora: unknown adapter(s) {unknown}; loaded: {self.adapters()}")
        device = next(iter(self.layers.values())).ranks.device
        slots = torch.tensor([-1 if a is None or a == BASE else self._slots[a] for a in adapters], dtype=torch.int32,
                             device=device)
        # the layers' choice of backend (the process's); asked only where the kernels can run at all
        kernels = (slots.is_cuda or interpreter_enabled()) and use_triton(slots)
        seg = _grouping(slots, self.max_adapters, kernels)
        rows = self._rows
        previous = rows.slots, rows.seg, rows.grouped
        rows.slots, rows.seg, rows.grouped = slots, seg, {}
        try:
            yield self
        finally:
            rows.slots, rows.seg, rows.grouped = previous

    def close(self) -> nn.Module:
        """Put the base layers back and drop the slots; returns the model."""
        self._refuse_if_running("close")
        for handle in self._hooks:
            handle.remove()
        for group in self._siblings:
            group.stop()
        self._siblings = []
        for name, layer in self.layers.items():
            parent, _, child = name.rpartition(".")
            layer._narrow()
            setattr(self.model.get_submodule(parent) if parent else self.model, child, layer.base_layer)
        self.layers, self._slots = {}, {}
        return self.model


_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")  # PEFT's keys, with or without the adapter name


def _pattern(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the longest key that ``module`` ends with."""
    for key in sorted(pattern, key=len, reverse=True):
        if re.match(rf"(.*\.)?({key})$", module):
            return type(default)(pattern[key])
    return default


def _read_adapter(adapter) -> tuple[dict, dict]:
    """(state dict, config dict) of a PEFT-format adapter directory, or of a (state_dict, config) pair."""
    if isinstance(adapter, (tuple, list)) and len(adapter) == 2:
        state, config = adapter
        return dict(state), dict(config if isinstance(config, dict) else config.__dict__)
    if not isinstance(adapter, (str, os.PathLike)) or not os.path.isdir(adapter):
        raise ValueError(f"MultiLora: an adapter is a local directory in PEFT's format or a (state_dict, config) "
                         f"pair, got {adapter!r}")
    from .adapter_io import _read_weights

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    return _read_weights(adapter), config
