"""Tile configs of the matmul kernels (lora_linear, lora_linear_tma, nf4_matmul's two paths) and the
multi-adapter kernels (multi_lora_shrink, multi_lora_expand), as data:
per GPU family, then per row bucket or by name.

A table maps a GPU family (``family(device)``) to its configs: "sm90" (Hopper, where these were
measured: bench/bench_lora.py --tune, tools/ab.sh) and "interpreter" (TRITON_INTERPRET=1: small
tiles, so the CPU tests stay quick and still cross tile edges). A GPU without an entry of its own
takes DEFAULT_FAMILY's. The switches in tuning.py pin one config in place of a table, for measuring.
The other kernels pick their tiles by rules beside them (``_shrink_grid``, ``_shrink_expand_grid``,
``_grad_grid``), which size the grid from the multiprocessor count.
"""
from __future__ import annotations

import torch

from .common import device_props
from .launch import INTERPRETING

DEFAULT_FAMILY = "sm90"  # the one family measured: other GPUs take its tiles

# lora_linear: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), each for up to its row
# count (None: any); small M takes long K steps, since few row blocks leave the K loop to set the pace
LINEAR_CONFIGS = {
    "sm90": ((16, (16, 32, 256, 8, 4, 4)),
             (64, (64, 64, 128, 8, 4, 4)),
             (256, (64, 128, 128, 8, 4, 3)),
             (None, (128, 128, 64, 8, 8, 4))),
    "interpreter": ((None, (16, 32, 32, 4, 4, 1)),),
}

# lora_linear_tma: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, TMA store, flatten[,
# warp specialize[, epilogue on two column halves]]) by name (``tma_config_name``). The 128 x 256 fp32
# tile cannot take the dropout mask or an fp32 expand in one piece (it spills), so with the mask bf16
# outputs take the epilogue on two 128 x 128 halves ("wide_masked") and other outputs 128 x 128 tiles
# ("narrow"); without the mask the halves only cost time.
TMA_CONFIGS = {
    "sm90": {"wide": (128, 256, 64, 16, 8, 3, True, True),
             "wide_masked": (128, 256, 64, 16, 8, 3, True, True, False, True),
             "narrow": (128, 128, 64, 8, 8, 4, True, True)},
    "interpreter": dict.fromkeys(("wide", "wide_masked", "narrow"), (16, 32, 32, 4, 4, 1, True, False)),
}

# nf4_matmul's decode path (kernels/nf4.py, M <= GEMV_MAX_M): (BLOCK_N, GROUPS, split_k, num_warps,
# num_stages), each for up to its row count: BLOCK_N rows of W by GROUPS whole quantization blocks per
# K step; split_k 0 takes the rule (``_gemv_split``). Its tiled path and nf4_matmul_t: lora_linear's
# fields (not on the QLoRA route, see docs/performance.md). nf4_dequantize: (elements per program,
# num_warps). Measured on H100 with tools/tune_nf4.py.
NF4_GEMV_CONFIGS = {
    "sm90": ((1, (16, 8, 0, 4, 1)),
             (4, (8, 4, 0, 4, 1)),
             (None, (128, 2, 0, 8, 1))),
    "interpreter": ((1, (4, 2, 0, 4, 1)),
                    (None, (16, 2, 0, 4, 1))),
}
NF4_TILED_CONFIGS = {
    "sm90": ((256, (64, 64, 64, 8, 4, 3)),
             (None, (128, 128, 64, 8, 8, 3))),
    "interpreter": ((None, (32, 32, 64, 4, 4, 1)),),
}
NF4_DEQUANT_CONFIGS = {"sm90": (4096, 4), "interpreter": (256, 4)}

# multi_lora_shrink / multi_lora_expand (kernels/multi_lora.py), each for up to its tokens per slot
# (cdiv(T, S): decode batches spread a few tokens over many adapters, prefill batches bring long runs of
# one): (shrink (BLOCK_M, BLOCK_K, BLOCK_R, split_k, num_warps, num_stages), expand (BLOCK_M, BLOCK_N,
# BLOCK_R, num_warps, num_stages, programs per multiprocessor)). BLOCK_R is a cap: block_r(R) where
# that is smaller (the columns expand loads t whole up to R_ONCE_MAX). The shrink halves BLOCK_K where
# its products run in fp32 (fp32 or split operands: three or two tensor-core products). split_k > 1
# splits the shrink's K over programs so that few tokens per slot still fill the GPU: atomics into a
# zeroed t (multi_lora_shrink), or at most MAX_PARTIALS partial sums that the layer launchers' consumer
# adds up (multi_lora, multi_lora_linear). The columns expand splits N so that there are about
# "programs per multiprocessor" programs. sm90: the first and last entries' tiles are
# tools/tune_multi_lora.py's best on an H100 at r = 16 (T = 64 and 256 over 32 slots; T = 4096 in 8
# runs; docs/performance.md), the middle one is untimed. The interpreter's small-bucket entry splits K
# so that the CPU tests take that path too.
MULTI_LORA_CONFIGS = {
    "sm90": ((16, ((16, 64, 16, 16, 4, 3), (16, 256, 16, 4, 2, 8))),
             (64, ((16, 128, 16, 4, 4, 3), (32, 128, 16, 4, 2, 4))),
             (None, ((16, 256, 32, 1, 4, 3), (64, 128, 16, 4, 2, 2)))),
    "interpreter": ((4, ((16, 32, 16, 2, 4, 1), (16, 32, 16, 4, 1, 1))),
                    (None, ((16, 32, 16, 1, 4, 1), (16, 32, 16, 4, 1, 1)))),
}

def family(device: torch.device) -> str:
    """The GPU family whose tables ``device`` takes: "interpreter" under the Triton interpreter, else
    "sm<major>0" by compute capability ("sm90": Hopper)."""
    if INTERPRETING:
        return "interpreter"
    return f"sm{device_props(device)[1]}0"


def for_device(table: dict, device: torch.device):
    """``table``'s entry for ``device``'s family, or DEFAULT_FAMILY's."""
    found = table.get(family(device))
    return table[DEFAULT_FAMILY] if found is None else found


def _by_rows(table: dict, M: int, device: torch.device) -> tuple:
    """The config of ``table`` (row bounds, the last None) for an M-row product on ``device``."""
    for bound, config in for_device(table, device):
        if bound is None or M <= bound:
            return config
    raise AssertionError("a row-bucketed config table ends with a None bound")


def linear_config(M: int, device: torch.device) -> tuple:
    """lora_linear's tile config for an M-row product on ``device``."""
    return _by_rows(LINEAR_CONFIGS, M, device)


def nf4_gemv_config(M: int, device: torch.device) -> tuple:
    """nf4_matmul's decode-path config (BLOCK_N, GROUPS, split_k, num_warps, num_stages) for M rows."""
    return _by_rows(NF4_GEMV_CONFIGS, M, device)


def nf4_tiled_config(M: int, device: torch.device) -> tuple:
    """nf4_matmul's tiled-path config (lora_linear's fields) for M rows."""
    return _by_rows(NF4_TILED_CONFIGS, M, device)


def nf4_dequant_config(device: torch.device) -> tuple:
    """nf4_dequantize's (elements per program, num_warps)."""
    return for_device(NF4_DEQUANT_CONFIGS, device)


def multi_lora_config(tokens_per_slot: int, device: torch.device) -> tuple:
    """(shrink config, expand config) of the multi-adapter kernels for batches of about
    ``tokens_per_slot`` tokens per adapter slot on ``device``."""
    return _by_rows(MULTI_LORA_CONFIGS, tokens_per_slot, device)


def tma_config_name(out_dtype, has_seed: bool) -> str:
    """The TMA config of an output: bf16 the wide tiles (on two halves with the dropout mask), any
    other dtype the narrow ones."""
    if out_dtype != torch.bfloat16:
        return "narrow"
    return "wide_masked" if has_seed else "wide"
