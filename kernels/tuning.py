"""Measuring switches: environment variables that pin one kernel's tile config in place of its table
or rule (configs.py, the launchers' grid rules), or the route fastpeft takes (fastpeft/route.py), to
measure them against each other (tools/ab.sh) or reproduce a run.

    FASTPEFT_SHRINK_CONFIG  lora_shrink      BLOCK_M,BLOCK_K,split_k,num_warps,num_stages
    FASTPEFT_LINEAR_CONFIG  lora_linear      BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,num_stages
    FASTPEFT_TMA_CONFIG     lora_linear_tma  BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,num_stages,
                                             tma_store,flatten[,warp_specialize[,epilogue_split]]
                                             (flags 1 or true); the auto route then takes the TMA
                                             matmul whatever the tile width (``tma_wide``)
    FASTPEFT_GEMM           the base product's route: auto (default), triton, cublas or tma
    FASTPEFT_TMA_MIN_M      rows from which the auto route takes the TMA matmul (0: never)
    FASTPEFT_PDL            0: no programmatic dependent launch after a shrink
    FASTPEFT_NF4_GEMV_CONFIG   nf4_matmul's decode path   BLOCK_N,GROUPS,split_k (0: the rule),num_warps,num_stages
    FASTPEFT_NF4_TILED_CONFIG  nf4_matmul's tiled path, nf4_matmul_t   lora_linear's fields
    FASTPEFT_NF4_LUT        the 4-bit kernels' table lookup: 2 value pairs per byte, 1 a read per
                            element, 0 tl.gather (kernels/nf4.py)
    FASTPEFT_MULTI_LORA_FUSED  1: a mixed-adapter batch over a plain nn.Linear runs the layer as
                            multi_lora_linear (the LoRA terms and bias written, then cuBLAS's addmm);
                            default 0, F.linear then the LoRA terms in place (fastpeft/multi_lora.py
                            ``fusable``)
    FASTPEFT_MULTI_LORA_WIDE   1 / 0: MultiLora's layers over a plain nn.Linear are wide (the slots' A
                            below the weight, one product, no shrink) wherever they can be, or never;
                            unset, by size (fastpeft/multi_lora.py ``widens``)
    FASTPEFT_MULTI_LORA_TMA    1 / 0: MultiLora's plain bf16 layers run a batch as multi_lora_linear_tma
                            (the TMA matmul with the LoRA terms in its epilogue) whenever its operands
                            allow, or never; unset, prefill batches alone (``prefill_tma``)
    FASTPEFT_MULTI_LORA_GROUP  0: MultiLora keeps sibling wide layers of one input (q, k, v; gate, up)
                            apart, each its own product and expand per call; default 1, one of each
                            for the group in eager forwards (fastpeft/multi_lora.py ``_Siblings``)

They are read once, at first use, not per call: a script or test that changes them afterwards calls
``reload()``, which reads them again and drops the launchers' kept plans (``launch._plans``), since
those were built with the old pins; ``set_switches`` and ``switched`` (a block) set them and reload.
"""
from __future__ import annotations

import contextlib
import os

from . import launch

SHRINK = "FASTPEFT_SHRINK_CONFIG"
LINEAR = "FASTPEFT_LINEAR_CONFIG"
TMA = "FASTPEFT_TMA_CONFIG"
GEMM = "FASTPEFT_GEMM"
TMA_MIN_M = "FASTPEFT_TMA_MIN_M"
PDL = "FASTPEFT_PDL"
NF4_GEMV = "FASTPEFT_NF4_GEMV_CONFIG"
NF4_TILED = "FASTPEFT_NF4_TILED_CONFIG"
NF4_LUT = "FASTPEFT_NF4_LUT"
MULTI_LORA_FUSED = "FASTPEFT_MULTI_LORA_FUSED"
MULTI_LORA_WIDE = "FASTPEFT_MULTI_LORA_WIDE"
MULTI_LORA_TMA = "FASTPEFT_MULTI_LORA_TMA"
MULTI_LORA_GROUP = "FASTPEFT_MULTI_LORA_GROUP"
SWITCHES = (SHRINK, LINEAR, TMA, GEMM, TMA_MIN_M, PDL, NF4_GEMV, NF4_TILED, NF4_LUT, MULTI_LORA_FUSED,
            MULTI_LORA_WIDE, MULTI_LORA_TMA, MULTI_LORA_GROUP)
GEMM_ROUTES = ("auto", "triton", "cublas", "tma")


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


def _gemm(name: str, value: str) -> str:
    if value not in GEMM_ROUTES:
        raise ValueError(f"{name} must be {', '.join(GEMM_ROUTES)}, got {value!r}")
    return value


def _lut(name: str, value: str) -> int:
    if value not in ("0", "1", "2"):
        raise ValueError(f"{name} must be 0, 1 or 2, got {value!r}")
    return int(value)


def _choice(name: str, value: str, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be {' or '.join(choices)}, got {value!r}")
    return value


def _rows(name: str, value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"{name} must be a row count (0: never), got {value!r}")
    return int(value)


_PARSERS = {
    GEMM: _gemm,
    TMA_MIN_M: _rows,
    PDL: lambda name, value: value != "0",
    SHRINK: lambda name, value: _ints(name, value, "BLOCK_M,BLOCK_K,split_k,num_warps,num_stages"),
    LINEAR: lambda name, value: _ints(name, value, "BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,num_stages"),
    TMA: _tma,
    NF4_GEMV: lambda name, value: _ints(name, value, "BLOCK_N,GROUPS,split_k,num_warps,num_stages"),
    NF4_TILED: lambda name, value: _ints(name, value, "BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,num_stages"),
    NF4_LUT: _lut,
    MULTI_LORA_FUSED: lambda name, value: value == "1",
    MULTI_LORA_WIDE: lambda name, value: _choice(name, value, ("0", "1")) == "1",
    MULTI_LORA_TMA: lambda name, value: _choice(name, value, ("0", "1")) == "1",
    MULTI_LORA_GROUP: lambda name, value: _choice(name, value, ("0", "1")) == "1",
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


def pinned(name: str):
    """What switch ``name`` pins, parsed (a tile config tuple, a route name, a row count or a flag), or
    None where it is unset."""
    pins = _pins if _pins is not None else reload()
    return pins[name]


def set_switches(values: dict) -> None:
    """Set the switches ``values`` ({name: value, None to unset}) in the environment and read them again."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    reload()


@contextlib.contextmanager
def switched(values: dict):
    """The switches ``values`` ({name: value, None to unset}) set within the block, restored after it."""
    saved = {name: os.environ.get(name) for name in values}
    set_switches(values)
    try:
        yield
    finally:
        set_switches(saved)
