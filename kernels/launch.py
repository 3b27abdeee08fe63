"""Kernel launches with less host work than ``kernel[grid](...)``.

Triton's ``JITFunction.run`` re-derives, on every call, each argument's specialization, the cache
key and the launch options. On the H100 machine's host that costs 40-90 µs a launch (a cuBLAS
matmul call: 20 µs), and a LoRA layer's forward + backward launches 5-6 kernels, so at decode
sizes and in a whole training step the host, not the GPU, sets the pace (bench/NOTES.md).

``launch(kernel, grid, args, **meta)`` does the same launch. The first call for a given key goes
through Triton (which compiles and caches as usual) and keeps the ``CompiledKernel`` it returns;
later calls with the same key hand the arguments straight to that compiled kernel's launcher. The
key holds everything Triton specializes a kernel on: each tensor's dtype and 16-byte alignment,
each integer's ==1 / divisible-by-16 / 32-or-64-bit class, the constexprs and launch options, and
the device. ``FASTPEFT_FAST_LAUNCH=0`` (read at import) sends every launch through Triton; under
the Triton interpreter every launch goes through Triton.
"""
from __future__ import annotations

import os

import torch

# Read once, as triton.jit itself does when it decorates a kernel (the kernel modules use it too).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
ENABLED = os.environ.get("FASTPEFT_FAST_LAUNCH", "1") != "0" and not INTERPRETING

_compiled: dict = {}  # (kernel, key) -> (compiled kernel, constexpr values after the positional args)


def _arg_key(v):
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16 == 0
    if isinstance(v, bool):
        return "b", v
    if isinstance(v, int):
        return "i", v == 1, v % 16 == 0, (-(2**31) <= v < 2**31) + (v < 2**63)
    if isinstance(v, float):
        return "f"
    return type(v), v


def launch(kernel, grid: tuple, args: tuple, **meta) -> None:
    """``kernel[grid](*args, **meta)``: ``args`` are the kernel's leading parameters in order;
    ``meta`` holds the rest (constexprs by name) and the launch options (num_warps, num_stages)."""
    if not ENABLED:
        kernel[grid](*args, **meta)
        return
    key = (kernel, tuple(_arg_key(a) for a in args), tuple(meta.items()), torch.cuda.current_device())
    hit = _compiled.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **meta)
        if compiled is not None and hasattr(compiled, "function"):
            tail = tuple(meta[name] for name in kernel.arg_names[len(args):])
            _compiled[key] = (compiled, tail)
        return
    compiled, tail = hit
    compiled[grid + (1,) * (3 - len(grid))](*args, *tail)
