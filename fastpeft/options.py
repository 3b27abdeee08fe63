"""User-facing options: which backend computes the LoRA ops, and which multi-layer fused ops run.

Two levels, read once:

- the process's options, seeded when fastpeft is imported from ``FASTPEFT_BACKEND``,
  ``FASTPEFT_FUSE_MLP`` and ``FASTPEFT_GROUP_PROJECTIONS`` (the environment only seeds them), and
  changed with :func:`set_options`;
- a model's own, given as ``fastpeft.patch(model, config, options=Options(...))``: its layers, MLPs
  and projection groups use those instead of the process's (all of them: a field not given is
  that field's default, not the process's value).

``backend``: ``"auto"`` (the Triton kernels on CUDA tensors, the reference path elsewhere),
``"triton"`` (always the kernels; CPU tensors need ``TRITON_INTERPRET=1``) or ``"reference"``
(plain PyTorch). ``fuse_mlp``: GLU MLPs with LoRA on gate, up and down run as one op
(``fastpeft/mlp.py``). ``group_projections``: q, k and v of one input run as one op
(``fastpeft/group.py``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

BACKENDS = ("auto", "triton", "reference")
OPTIONS_ATTR = "_fastpeft_options"  # on a patched model's layers, MLPs and groups: the model's Options


@dataclass(frozen=True)
class Options:
    backend: str = "auto"
    fuse_mlp: bool = True
    group_projections: bool = True

    def __post_init__(self):
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("fuse_mlp", "group_projections"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")

    @classmethod
    def from_env(cls, environ=None) -> "Options":
        """The defaults, with ``FASTPEFT_BACKEND``, ``FASTPEFT_FUSE_MLP`` and
        ``FASTPEFT_GROUP_PROJECTIONS`` (``0`` turns a fusion off) where set."""
        environ = os.environ if environ is None else environ
        backend = environ.get("FASTPEFT_BACKEND", "").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"FASTPEFT_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
        return cls(backend=backend, fuse_mlp=environ.get("FASTPEFT_FUSE_MLP", "1") != "0",
                   group_projections=environ.get("FASTPEFT_GROUP_PROJECTIONS", "1") != "0")


_process = Options.from_env()


def get_options() -> Options:
    """The process's options (what models patched without ``options=`` use)."""
    return _process


def set_options(options: Optional[Options] = None, **changes) -> Options:
    """Set the process's options (an :class:`Options`, or fields to change) and return the previous ones:
    ``previous = fastpeft.set_options(backend="reference"); ...; fastpeft.set_options(previous)``."""
    global _process
    if options is not None and not isinstance(options, Options):
        raise TypeError(f"set_options takes a fastpeft.Options, got {type(options).__name__}")
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Options)})
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; Options has {[f.name for f in dataclasses.fields(Options)]}")
    previous = _process
    _process = dataclasses.replace(options or _process, **changes)
    return previous


def of(module) -> Options:
    """The options a patched module runs with: its model's, else the process's."""
    return module.__dict__.get(OPTIONS_ATTR) or _process
