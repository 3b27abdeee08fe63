"""The base product's route: which kernels compute x·Wᵀ (forward) and dY·W (dX) together with the
LoRA term, for each kind of base weight.

A base weight is what a LoRA layer's frozen ``W`` is stored as. Each kind has a format name and two
functions (``BaseRoute``): ``forward`` gives (y = x·Wᵀ + b + s·xa·Bᵀ, xa = drop(x)·Aᵀ) and ``dx``
gives (dX = dY·W + s·(dyb·A) ⊙ keep/(1-p), dyb = dY·B). The op path (``fastpeft/ops.py``) calls
:func:`forward` and :func:`dx` and never looks at the weight itself; a new kind of base (a 4-bit
weight) registers its format with :func:`register` instead of editing those call sites. A base
weight that is not a tensor has ``format``, ``shape`` (N, K), ``device`` and ``op_args()``.

The dense base (a float tensor (N, K)) has three routes, chosen by the number of rows M
(:func:`dense_route`; the measurements behind the bounds are in docs/performance.md):

    triton  M < CUBLAS_MIN_M: lora_shrink, then the Triton matmul with the LoRA epilogue
            (``lora_linear``), launched with programmatic dependent launch on Hopper (:func:`pdl`)
    cublas  C = b + s·xa·Bᵀ and xa from one pass over x (``lora_shrink_expand``), then cuBLAS adds
            x·Wᵀ onto C (beta = 1)
    tma     M >= TMA_MIN_M on Hopper with bf16 outputs: lora_shrink, then the persistent TMA matmul
            with the LoRA epilogue (``lora_linear_tma``); operands it cannot take go the cuBLAS route

FASTPEFT_GEMM, FASTPEFT_TMA_MIN_M and FASTPEFT_PDL pin these for measuring (``kernels/tuning.py``,
read once).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .kernels import tuning
from .kernels.common import pdl_ok
from .kernels.linear import lora_linear, lora_linear_tma, tma_ok, tma_wide
from .kernels.shrink import lora_shrink
from .kernels.shrink_expand import lora_shrink_expand

CUBLAS_MIN_M = 512  # from here cuBLAS onto a prefilled C beats the Triton matmul
TMA_MIN_M = 4096  # from here the persistent TMA matmul beats cuBLAS onto C (Hopper, bf16 outputs)
DENSE = "dense"


class BaseRoute(NamedTuple):
    forward: Callable  # (x2, weight, bias, A, B, s, seed, threshold, drop_scale) -> (y2, xa)
    dx: Callable  # (dy2, x_dtype, weight, A, B, s, seed, threshold, drop_scale, need_dx, need_da, dx_into) -> (dx, dyb)
    rebuild: Optional[Callable] = None  # (tensor, state tensors, format) -> the weight (the custom op's inputs)


_ROUTES: dict[str, BaseRoute] = {}


def register(fmt: str, route: BaseRoute) -> None:
    """Make base weights whose ``format`` is ``fmt`` (or starts with ``fmt:``) run through ``route``."""
    _ROUTES[fmt] = route


def _route_of(fmt: str) -> BaseRoute:
    try:
        return _ROUTES[fmt.split(":", 1)[0]]
    except KeyError:
        raise NotImplementedError(f"no route computes a base weight of format {fmt!r}; known: {sorted(_ROUTES)}") from None


def op_args(weight) -> tuple:
    """A base weight as the custom op's (weight, weight_state, weight_format): a tensor as (W, [], "dense");
    another base as its ``op_args()`` (its packed tensor, its state tensors, its format with any shape
    or block size the tensors do not carry)."""
    if weight is None or isinstance(weight, torch.Tensor):
        return weight, [], DENSE
    return weight.op_args()


def from_op_args(weight, state, fmt: str):
    """The base weight that :func:`op_args` flattened."""
    if fmt == DENSE:
        return weight
    return _route_of(fmt).rebuild(weight, state, fmt)


def forward(x2, weight, bias, lora_a, lora_b, scaling: float, seed, threshold: int, drop_scale: float):
    """(y2 (M, N), xa (M, R) fp32) for a 2-D x over ``weight``'s route; weight None: the LoRA branch alone."""
    if weight is None or isinstance(weight, torch.Tensor):
        return dense_forward(x2, weight, bias, lora_a, lora_b, scaling, seed, threshold, drop_scale)
    return _route_of(weight.format).forward(x2, weight, bias, lora_a, lora_b, scaling, seed, threshold, drop_scale)


def dx(dy2, x_dtype, weight, lora_a, lora_b, scaling: float, seed, threshold: int, drop_scale: float,
       need_dx: bool, need_da: bool, dx_into=None):
    """(dX (M, K) in ``x_dtype`` or None, dyb = dY·B (M, R) fp32 where dA needs it) over ``weight``'s
    route; with ``dx_into`` (another projection's dX of the same input) dX is added into it."""
    if weight is None or isinstance(weight, torch.Tensor):
        return dense_dx(dy2, x_dtype, weight, lora_a, lora_b, scaling, seed, threshold, drop_scale, need_dx,
                        need_da, dx_into)
    return _route_of(weight.format).dx(dy2, x_dtype, weight, lora_a, lora_b, scaling, seed, threshold, drop_scale,
                                     need_dx, need_da, dx_into)


# --- the dense base ---------------------------------------------------------------------------
def dense_route(M: int, wide_tma: bool = True) -> str:
    """'triton', 'cublas' or 'tma' for an M-row product over a dense weight (FASTPEFT_GEMM pins one;
    the cuBLAS route also runs on CPU, via torch's addmm). ``wide_tma``: whether the TMA matmul would
    run its wide tiles (``tma_wide``: bf16 outputs); its narrow ones lost to cuBLAS everywhere."""
    choice = tuning.pinned(tuning.GEMM) or "auto"
    if choice != "auto":
        return choice
    if M < CUBLAS_MIN_M:
        return "triton"
    tma_min = tuning.pinned(tuning.TMA_MIN_M)
    tma_min = TMA_MIN_M if tma_min is None else tma_min
    return "tma" if wide_tma and 0 < tma_min <= M else "cublas"


def pdl(device: torch.device) -> bool:
    """Whether the Triton route's matmul after a shrink is launched with programmatic dependent launch
    (Hopper): it streams W while the shrink finishes and waits for it before its epilogue."""
    return tuning.pinned(tuning.PDL) is not False and pdl_ok(device)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is a no-op (a dispatcher round trip each on the host)."""
    return t if t.dtype == dtype else t.to(dtype)


def dense_forward(x2, weight: Optional[torch.Tensor], bias, lora_a, lora_b, scaling: float, seed, threshold: int,
                  drop_scale: float):
    route = dense_route(x2.shape[0], tma_wide(x2.dtype, False)) if weight is not None else "cublas"
    if route == "tma":
        w = as_dtype(weight, x2.dtype)
        if tma_ok(x2, w):
            parts = lora_shrink(x2, lora_a, seed, threshold, drop_scale, partial=True)
            return lora_linear_tma(x2, w, bias, parts, lora_b, scaling)
    if route == "triton":
        overlap = pdl(x2.device)
        parts = lora_shrink(x2, lora_a, seed, threshold, drop_scale, launch_dependents=overlap, partial=True)
        return lora_linear(x2, weight, bias, parts, lora_b, scaling, pdl=overlap)
    # C = b + s·drop(x)Aᵀ·Bᵀ in one pass; then (with a base) cuBLAS adds x·Wᵀ onto it (beta = 1)
    y, xa = lora_shrink_expand(x2, lora_a, lora_b, bias, scaling, seed, threshold, drop_scale)
    if weight is not None:
        y.addmm_(x2, as_dtype(weight.t(), x2.dtype))
    return y, xa


def dense_dx(dy2, x_dtype, weight: Optional[torch.Tensor], lora_a, lora_b, scaling: float, seed, threshold: int,
             drop_scale: float, need_dx: bool, need_da: bool, dx_into=None):
    dx = dyb = None
    masked = seed is not None
    route = dense_route(dy2.shape[0], tma_wide(x_dtype, masked)) if need_dx and weight is not None else "cublas"
    wt = as_dtype(weight, dy2.dtype).t() if route == "tma" else None
    if route == "tma" and tma_ok(dy2, wt):
        parts = lora_shrink(dy2, lora_b.t(), partial=True)
        into = dx_into is not None and tma_ok(dx_into, wt)  # dX added into it by the kernel
        dx, dyb = lora_linear_tma(dy2, wt, None, parts, lora_a.t(), scaling, seed, threshold, drop_scale,
                                  out_dtype=x_dtype, mask_output=True, accumulate=dx_into if into else None)
        dx = dx if dx_into is None or into else dx_into.add_(dx)
    elif need_dx:
        if route == "triton":
            overlap = pdl(dy2.device)
            parts = lora_shrink(dy2, lora_b.t(), launch_dependents=overlap, partial=True)
            dx, dyb = lora_linear(dy2, weight.t(), None, parts, lora_a.t(), scaling, seed, threshold,
                                  drop_scale, out_dtype=x_dtype, mask_output=True, pdl=overlap)
            dx = dx if dx_into is None else dx_into.add_(dx)
        else:
            dx, dyb = lora_shrink_expand(dy2, lora_b.t(), lora_a.t(), None, scaling, seed, threshold, drop_scale,
                                         mask_output=True, out_dtype=x_dtype, accumulate=dx_into)
            if weight is not None:
                dx.addmm_(dy2, as_dtype(weight, dy2.dtype))
    elif need_da:
        dyb = lora_shrink(dy2, lora_b.t())
    return dx, dyb


register(DENSE, BaseRoute(dense_forward, dense_dx))
