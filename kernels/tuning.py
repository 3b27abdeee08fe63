"""Measuring switches: environment variables that pin one kernel's tile config in place of its table
or rule (configs.py, the launchers' grid rules), to measure configs against each other
(scripts/diag.py, scripts/ab.sh) or reproduce a run.

    FASTPEFT_SHRINK_CONFIG  lora_shrink      BLOCK_M,BLOCK_K,split_k,num_warps,num_stages
    FASTPEFT_LINEAR_CONFIG  lora_linear      BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,num_stages
    FASTPEFT_TMA_CONFIG     lora_linear_tma  BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,num_stages,
                                             tma_store,flatten[,warp_specialize[,epilogue_split]]
                                             (flags 1 or true); the auto route then takes the TMA
                                             matmul whatever the tile width (``tma_wide``)

They are read once, at first use, not per call: a script or test that changes them afterwards calls
``reload()``, which reads them again and drops the launchers' kept plans (``launch._plans``), since
those were built with the old pins.
"""
from __future__ import annotations

import os

from . import launch

SHRINK = "FASTPEFT_SHRINK_CONFIG"
LINEAR = "FASTPEFT_LINEAR_CONFIG"
TMA = "FASTPEFT_TMA_CONFIG"
SWITCHES = (SHRINK, LINEAR, TMA)


def _ints(name: str, value: str, fields: str) -> tuple:
    try:
        parsed = tuple(int(v) for v in value.split(","))
    except ValueError:
        parsed = ()
    if len(parsed) != len(fields.split(",")):
        raise ValueError(f"{name} must be {fields}, got {value!r}")
    return parsed


def _tma(name: str, value: str) -> tuple:
    fields = value.split(",")
    if not 8 <= len(fields) <= 10:
        raise ValueError(f"{name} must be BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,num_stages,tma_store,flatten"
                         f"[,warp_specialize[,epilogue_split]], got {value!r}")
    return _ints(name, ",".join(fields[:6]), "BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,num_stages") + \
        tuple(v.strip().lower() in ("1", "true") for v in fields[6:])


_PARSERS = {
    SHRINK: lambda name, value: _ints(name, value, "BLOCK_M,BLOCK_K,split_k,num_warps,num_stages"),
    LINEAR: lambda name, value: _ints(name, value, "BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,num_stages"),
    TMA: _tma,
}
_pins: dict | None = None  # switch -> its parsed config, or None where unset; read at first use


def reload() -> dict:
    """Read the switches from the environment again (a bad value raises ValueError, naming it) and
    drop the plans built with the old ones; returns {switch: parsed config or None}."""
    global _pins
    _pins = None  # a bad value leaves nothing half-read: the next use reads again
    pins = {name: parse(name, os.environ[name]) if os.environ.get(name) else None
            for name, parse in _PARSERS.items()}
    launch._plans.clear()
    _pins = pins
    return pins


def pinned(name: str) -> tuple | None:
    """The config that switch ``name`` pins, parsed, or None where it is unset."""
    pins = _pins if _pins is not None else reload()
    return pins[name]
