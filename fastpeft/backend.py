"""The one backend switch: fused Triton kernels or the pure-PyTorch reference path.

``FASTPEFT_BACKEND=triton`` forces the kernels (on CPU tensors they need ``TRITON_INTERPRET=1``),
``FASTPEFT_BACKEND=reference`` forces plain PyTorch; unset, CUDA tensors take the kernels and
everything else the reference path. Nothing else in fastpeft asks which device it runs on.
"""
from __future__ import annotations

import torch

from .kernels.launch import env

_CHOICES = ("auto", "triton", "reference")


_PARSED: dict = {}  # the variable's raw value -> the backend it names (read at every call)


def backend_name() -> str:
    raw = env("FASTPEFT_BACKEND", "auto")
    name = _PARSED.get(raw)
    if name is None:
        name = raw.strip().lower() or "auto"
        if name not in _CHOICES:
            raise ValueError(f"FASTPEFT_BACKEND must be one of {', '.join(_CHOICES)}, got {name!r}")
        _PARSED[raw] = name
    return name


def interpreter_enabled() -> bool:
    return env("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True when the LoRA ops on ``x`` should run the Triton kernels."""
    name = backend_name()
    if name == "reference":
        return False
    if name == "triton":
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError(
                f"FASTPEFT_BACKEND=triton needs CUDA tensors or TRITON_INTERPRET=1, got a tensor on {x.device}"
            )
        return True
    return x.is_cuda
