"""QLoRA: LoRA over a bitsandbytes 4-bit base layer (``bnb.nn.Linear4bit``: NF4 or FP4, double-quantized
absmax or not), its weight read where it lies.

A LoRA layer over a Linear4bit keeps the ``Params4bit`` as it is (no copy, no requantization, no dense
W kept). ``base_of(layer)`` hands the route a ``Base4bit``: the weight as the kernels read it
(kernels/nf4.py's ``Packed4bit``) and as the reference path dequantizes it (fastpeft/nf4.py), built once
per weight and kept on the layer until the weight changes. The "4bit" route (fastpeft/route.py):

    forward  M <= FUSED_MAX_M    lora_shrink, then nf4_matmul's decode path, the LoRA term in its epilogue
             otherwise           W dequantized to x's dtype (nf4_dequantize: a transient tensor), then the
                                 dense route (cuBLAS or the TMA matmul with the LoRA term fused)
    dX                           W dequantized, then the dense route's dX

The 4-bit kernels' tiled products (nf4_matmul path="tiled", nf4_matmul_t), which dequantize inside
the main loop, measured far slower than dequantize + cuBLAS at every M they could take
(docs/performance.md); they stay in kernels/nf4.py, tested, off the route.

bitsandbytes on CPU (with AVX512-BF16) repacks a Linear4bit's weight in place after an inference
forward (``quant_state.packing_format_for_cpu``: another byte order, bf16 absmax, no double
quantization) and its own backward then reads that layout as the standard one (PEFT's LoRA gradients
come out wrong). ``Base4bit`` reads either layout, without changing the layer.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import route
from .nf4 import BLOCKSIZES_4BIT, TABLES_4BIT, NestedAbsmax, Quant4bitState, dequantize_state

FORMAT = "4bit"
FUSED_MAX_M = 16  # up to here the decode kernel; above, dequantize + the dense route (docs/performance.md)
_CACHE_ATTR = "_fastpeft_base4bit"


def is_4bit(module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (by name: bitsandbytes is not imported)."""
    weight = getattr(module, "weight", None)
    return type(weight).__name__ == "Params4bit" or any(c.__name__ == "Linear4bit" for c in type(module).__mro__)


def check_4bit(name: str, module) -> None:
    """Raise unless fastpeft can put LoRA on the 4-bit layer ``module``, naming what is missing."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    where = f"fastpeft cannot apply LoRA to {name!r} ({type(module).__name__})"
    if state is None:
        raise ValueError(f"{where}: its 4-bit weight has no quant_state (not quantized yet: bitsandbytes quantizes a "
                         f"Linear4bit when it is moved to a device, or load the model with a BitsAndBytesConfig)")
    if state.quant_type not in TABLES_4BIT:
        raise NotImplementedError(f"{where}: quant_type {state.quant_type!r} is not supported (nf4 or fp4)")
    if int(state.blocksize) not in BLOCKSIZES_4BIT:
        raise NotImplementedError(f"{where}: blocksize {state.blocksize} is not supported ({BLOCKSIZES_4BIT})")
    shape = tuple(state.shape)
    if shape != (module.out_features, module.in_features):
        raise ValueError(f"{where}: its quant_state holds a {shape} weight but the layer is "
                         f"({module.out_features}, {module.in_features})")


class Base4bit:
    """A Linear4bit's frozen weight as a LoRA base (route format "4bit"): ``shape`` (N, K), ``device``,
    ``quant`` (the kernels' Packed4bit, None where K is odd), ``state`` (fastpeft.nf4's
    Quant4bitState) and ``packed`` (its standard-layout bytes)."""

    format = FORMAT
    __slots__ = ("param", "quant_state", "data_ptr", "shape", "device", "packed", "state", "quant", "compute_dtype")

    def __init__(self, param, packed, state: Quant4bitState, compute_dtype=None, quant_state=None):
        from .kernels.nf4 import packed_4bit

        self.param, self.quant_state = param, quant_state
        self.data_ptr = None if param is None else param.data_ptr()
        self.packed, self.state, self.compute_dtype = packed, state, compute_dtype
        self.shape = tuple(state.shape)
        self.device = packed.device
        N, K = self.shape
        nested = None
        if state.nested is not None:
            n = state.nested
            nested = (n.code, n.absmax, n.blocksize, n.offset)
        code = torch.tensor(TABLES_4BIT[state.quant_type], dtype=torch.float32, device=self.device)
        self.quant = packed_4bit(packed, state.absmax, code, N, K, state.blocksize, nested) if K % 2 == 0 else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W (N, K) in ``dtype`` as bitsandbytes computes it (dequantized in its stored dtype, then cast:
        the same single rounding as dequantizing to ``dtype`` straight from fp32 values); the 4-bit
        kernel where it can run, else the reference (CPU without the interpreter)."""
        from .backend import use_triton

        stored = self.state.dtype
        if self.quant is not None and use_triton(self.packed):
            from .kernels.nf4 import nf4_dequantize

            return route.as_dtype(nf4_dequantize(self.quant, dtype if stored in (torch.float32, dtype) else stored),
                                  dtype)
        return route.as_dtype(dequantize_state(self.packed, self.state), dtype)

    def op_args(self) -> tuple:
        """(packed bytes, state tensors, format): the custom op's flattened form of this weight."""
        s = self.state
        tensors = [s.absmax]
        nested = s.nested is not None
        if nested:
            offset = s.nested.offset
            if not isinstance(offset, torch.Tensor):
                offset = torch.tensor(float(offset), device=self.device)
            tensors += [s.nested.code, s.nested.absmax, offset]
        fmt = ":".join((FORMAT, s.quant_type, str(s.blocksize), str(s.dtype).replace("torch.", ""),
                        str(s.nested.blocksize) if nested else "0", *map(str, self.shape)))
        return self.packed, tensors, fmt


def _rebuild(packed, tensors, fmt: str) -> Base4bit:
    _, quant_type, blocksize, dtype, blocksize2, N, K = fmt.split(":")
    nested = None
    if int(blocksize2):
        nested = NestedAbsmax(tensors[1], tensors[2], int(blocksize2), tensors[3])
    state = Quant4bitState(tensors[0], (int(N), int(K)), int(blocksize), quant_type, getattr(torch, dtype), nested)
    return Base4bit(None, packed, state)


def _standard_layout(data: torch.Tensor, quant_state) -> tuple:
    """(packed bytes, Quant4bitState) of a weight that bitsandbytes repacked for its CPU kernel
    (``packing_format_for_cpu``), in the standard layout, without changing the weight: the bytes are
    (N, K/2), each 32-row group stored K-byte-column major with the 32 low nibbles then the 32 high
    ones of 32 rows' consecutive byte pair; absmax is (K / blocksize, N) bf16, never nested."""
    N, K = (int(s) for s in quant_state.shape)
    packed = data.reshape(-1, 32)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # [..., 64]: element 2j+1's codes, then 2j's
    codes = codes.reshape(N // 32, K // 2, 32, 2).transpose(1, 2).reshape(-1)
    standard = (codes[0::2] << 4) | codes[1::2]
    absmax = quant_state.absmax.T.reshape(-1).float()
    dtype = getattr(quant_state, "original_dtype", quant_state.dtype)
    return standard, Quant4bitState(absmax, (N, K), int(quant_state.blocksize), quant_state.quant_type, dtype, None)


def _read(weight) -> tuple:
    """(packed uint8 bytes in the standard layout, Quant4bitState) of a Params4bit, whichever layout
    bitsandbytes left it in; nothing is changed."""
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return _standard_layout(weight.data, state)
    packed = weight.data.reshape(-1)
    if packed.dtype != torch.uint8:  # quant_storage (bf16, say, for FSDP): the same bytes
        packed = packed.view(torch.uint8)
    return packed, Quant4bitState.from_bnb(state)


def base_of(layer, weight) -> Base4bit:
    """The ``Base4bit`` of LoRA layer ``layer``'s 4-bit ``weight`` (its base layer's Params4bit), kept in
    the layer while the weight's data and quant_state stay the same objects."""
    quant_state = weight.quant_state
    cached = layer.__dict__.get(_CACHE_ATTR)
    if (cached is not None and cached.param is weight and cached.quant_state is quant_state
            and cached.data_ptr == weight.data_ptr()):
        return cached
    if quant_state is None:
        raise ValueError(f"{type(layer).__name__}: its 4-bit base weight has no quant_state (not quantized)")
    packed, state = _read(weight)
    compute = getattr(layer.base_layer, "compute_dtype", None)
    base = Base4bit(weight, packed, state, compute, quant_state)
    layer.__dict__[_CACHE_ATTR] = base
    return base


# --- the route ----------------------------------------------------------------------------------
def matmul_4bit(x2: torch.Tensor, w, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2 (M, K) · Wᵀ + bias for a kernels' Packed4bit ``w`` by the route's split without the LoRA term:
    the decode kernel up to FUSED_MAX_M rows, dequantize + cuBLAS above (the bench's 4-bit product)."""
    from .kernels.nf4 import nf4_dequantize, nf4_matmul

    if _decode(x2.shape[0], w):
        return nf4_matmul(x2, w, bias)
    return torch.nn.functional.linear(x2, nf4_dequantize(w, x2.dtype), bias)


def linear_4bit(x2: torch.Tensor, w: Base4bit, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2 (M, K) · Wᵀ + bias over a 4-bit base, no LoRA term (a multi-adapter layer's base product): the
    decode kernel up to FUSED_MAX_M rows, else W dequantized as bitsandbytes does, then cuBLAS."""
    from .kernels.nf4 import nf4_matmul

    b = None if bias is None else route.as_dtype(bias, x2.dtype)
    if _decode(x2.shape[0], w.quant):
        return nf4_matmul(x2, w.quant, b)
    return torch.nn.functional.linear(x2, w.dequantized(x2.dtype), b)


def _decode(M: int, quant) -> bool:
    """Whether an M-row product over ``quant`` (a Packed4bit or None) takes the decode kernel."""
    return quant is not None and M <= FUSED_MAX_M and quant.K % quant.blocksize == 0


def forward(x2, w: Base4bit, bias, lora_a, lora_b, scaling: float, seed, threshold: int, drop_scale: float):
    """(y2, xa) over a 4-bit base (the module docstring's split)."""
    from .kernels.nf4 import nf4_matmul
    from .kernels.shrink import lora_shrink

    b = None if bias is None else route.as_dtype(bias, x2.dtype)
    if not _decode(x2.shape[0], w.quant):
        return route.dense_forward(x2, w.dequantized(x2.dtype), b, lora_a, lora_b, scaling, seed, threshold,
                                   drop_scale)
    xa = lora_shrink(x2, lora_a, seed, threshold, drop_scale)
    return nf4_matmul(x2, w.quant, b, lora=(xa, lora_b, scaling)), xa


def dx(dy2, x_dtype, w: Base4bit, lora_a, lora_b, scaling: float, seed, threshold: int, drop_scale: float,
       need_dx: bool, need_da: bool, dx_into=None):
    """(dX or None, dyb) over a 4-bit base: the dense route's dX over W dequantized (dY·B alone where
    only dA needs it)."""
    from .kernels.shrink import lora_shrink

    if not need_dx:
        return None, (lora_shrink(dy2, lora_b.t()) if need_da else None)
    return route.dense_dx(dy2, x_dtype, w.dequantized(dy2.dtype), lora_a, lora_b, scaling, seed, threshold,
                          drop_scale, need_dx, need_da, dx_into)


route.register(FORMAT, route.BaseRoute(forward, dx, _rebuild))


# --- merge ----------------------------------------------------------------------------------------
@torch.no_grad()
def add_to_4bit(base_layer, delta: torch.Tensor, safe: bool = False, name: str = "") -> None:
    """W ← requantize(dequantize(W) + delta) with W's own settings (quant type, blocksize, double
    quantization, storage): a new Params4bit in the layer. Lossy: 4-bit rounding of W + delta."""
    import bitsandbytes as bnb

    weight = base_layer.weight
    state = weight.quant_state
    dense = dequantize_state(*_read(weight))  # bitsandbytes' dequantize, bit for bit (fastpeft/nf4.py)
    merged = (dense.float() + delta.to(dense.device).float()).to(dense.dtype)
    if safe and not torch.isfinite(merged).all():
        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
    nested = bool(getattr(state, "nested", False) or getattr(state, "original_nested", False))
    new = bnb.nn.Params4bit(merged.to("cpu"), requires_grad=False, blocksize=int(state.blocksize),
                            compress_statistics=nested, quant_type=state.quant_type,
                            quant_storage=getattr(weight, "quant_storage", torch.uint8), module=base_layer)
    base_layer.weight = new.to(dense.device)


def adapter_dtype_of(weight) -> Optional[torch.dtype]:
    """The float dtype a 4-bit weight was quantized from (bitsandbytes' QuantState.dtype)."""
    state = getattr(weight, "quant_state", None)
    return getattr(state, "original_dtype", getattr(state, "dtype", None)) if state is not None else None
