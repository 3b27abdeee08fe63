"""The one backend switch: fused Triton kernels or the pure-PyTorch reference path.

The choice is an option (``fastpeft/options.py``: ``backend``, the process's or a patched model's):
``"triton"`` forces the kernels (on CPU tensors they need ``TRITON_INTERPRET=1``), ``"reference"``
plain PyTorch; ``"auto"`` gives CUDA tensors the kernels and everything else the reference path.
Nothing else in fastpeft asks which device it runs on.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import options as _options


def backend_name() -> str:
    """The process's backend option."""
    return _options.get_options().backend


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor, backend: Optional[str] = None) -> bool:
    """True when the LoRA ops on ``x`` should run the Triton kernels (``backend``: a model's option,
    None for the process's)."""
    name = backend or _options.get_options().backend
    if name == "reference":
        return False
    if name == "triton":
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError(
                f"the triton backend needs CUDA tensors or TRITON_INTERPRET=1, got a tensor on {x.device}"
            )
        return True
    return x.is_cuda
