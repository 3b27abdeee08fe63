"""bitsandbytes' 4-bit weight format (NF4 / FP4) in plain PyTorch: the reference dequantize.

The layout (bitsandbytes 0.45.5 to 0.50.2): the weight W (out x in) is flattened row-major into n
elements; element i has a 4-bit code, two codes per uint8 byte with the FIRST element (even i) in the
HIGH nibble, so ``packed`` holds ceil(n / 2) bytes. Block ``i // blocksize`` of consecutive elements
(blocks run over the flattened weight and may span rows; the last one may be short) has one scale,
``absmax``, and

    W.flat[i] = (TABLE[code_i] * absmax[i // blocksize]).to(dtype)      multiplied in fp32

with TABLE the 16-entry NF4 or FP4 table below. Double quantization (bitsandbytes' ``QuantState.nested``,
``compress_statistics=True``) stores the block scales themselves as uint8 codes of a second,
blockwise 8-bit quantization:

    absmax[j] = nested.code[u8[j]] * nested.absmax[j // nested.blocksize] + offset   in fp32

Importing this module does not import bitsandbytes: ``Quant4bitState.from_bnb`` reads a
bitsandbytes ``QuantState`` by its attributes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# bitsandbytes.functional.get_4bit_type("nf4") / ("fp4"): the fp32 values it returns, written out
# (tests/test_quant_reference.py checks equality against the installed bitsandbytes).
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
FP4_TABLE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
    0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)  # fmt: skip
TABLES_4BIT = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class NestedAbsmax:
    """Double quantization of the block scales: absmax[j] = code[u8[j]] * absmax[j // blocksize] + offset."""

    code: torch.Tensor  # (256,) fp32: bitsandbytes' dynamic 8-bit map (QuantState.state2.code)
    absmax: torch.Tensor  # (ceil(blocks / blocksize),) fp32 (QuantState.state2.absmax)
    blocksize: int  # QuantState.state2.blocksize (256)
    offset: float | torch.Tensor  # QuantState.offset: the mean taken out of the scales before quantizing


@dataclass
class Quant4bitState:
    """What dequantizing one 4-bit weight needs, field for field bitsandbytes' QuantState.

    ``absmax`` is fp32 (one per block), or the uint8 codes when ``nested`` is set.
    """

    absmax: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int
    quant_type: str
    dtype: torch.dtype
    nested: NestedAbsmax | None = None

    @classmethod
    def from_bnb(cls, quant_state) -> "Quant4bitState":
        """Read a ``bitsandbytes.functional.QuantState`` (e.g. ``Params4bit.quant_state``) by attribute."""
        nested = None
        if getattr(quant_state, "nested", False):
            s2 = quant_state.state2
            nested = NestedAbsmax(s2.code, s2.absmax, int(s2.blocksize), quant_state.offset)
        return cls(
            quant_state.absmax,
            tuple(quant_state.shape),
            int(quant_state.blocksize),
            quant_state.quant_type,
            quant_state.dtype,
            nested,
        )


def table_4bit(quant_type: str, device=None) -> torch.Tensor:
    """The 16-entry fp32 code table of ``quant_type`` ("nf4" or "fp4")."""
    if quant_type not in TABLES_4BIT:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return torch.tensor(TABLES_4BIT[quant_type], dtype=torch.float32, device=device)


def nested_absmax(codes: torch.Tensor, nested: NestedAbsmax) -> torch.Tensor:
    """The fp32 block scales from their uint8 codes (bitsandbytes' dequantize_blockwise, + offset)."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"nested absmax codes must be uint8, got {codes.dtype}")
    blocks = codes.numel()
    needed = -(-blocks // nested.blocksize)
    if nested.absmax.numel() != needed:
        raise ValueError(
            f"nested absmax has {nested.absmax.numel()} scales, expected {needed} "
            f"({blocks} codes in blocks of {nested.blocksize})"
        )
    j = torch.arange(blocks, device=codes.device)
    scaled = nested.code.float()[codes.reshape(-1).long()] * nested.absmax.float()[j // nested.blocksize]
    offset = nested.offset.float() if isinstance(nested.offset, torch.Tensor) else float(nested.offset)
    return scaled + offset


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
    nested: NestedAbsmax | None = None,
) -> torch.Tensor:
    """W (``shape``, ``dtype``) from bitsandbytes' packed 4-bit codes; bit for bit bitsandbytes' result.

    packed: ceil(n / 2) bytes, (n/2,) or (n/2, 1) as Params4bit stores them (another storage dtype is
    read as its bytes); absmax: ceil(n / blocksize) fp32 scales, or their uint8 codes with ``nested``.
    """
    table = table_4bit(quant_type, packed.device)
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize}")
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    data = packed.reshape(-1)
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    if data.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {data.numel()} bytes, expected {(n + 1) // 2} for a weight of shape {shape}")
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(
            f"absmax has {absmax.numel()} scales, expected {blocks} ({n} elements in blocks of {blocksize})"
        )
    if nested is None and absmax.dtype == torch.uint8:
        raise ValueError("absmax is uint8 (double-quantized scales) but no nested state was given")
    scales = nested_absmax(absmax, nested) if nested is not None else absmax.reshape(-1).float()
    codes = torch.stack([data >> 4, data & 0xF], dim=-1).reshape(-1)[:n].long()  # first element: high nibble
    i = torch.arange(n, device=packed.device)
    return (table[codes] * scales[i // blocksize]).to(dtype).reshape(shape)


def dequantize_state(packed: torch.Tensor, state: Quant4bitState) -> torch.Tensor:
    """``dequantize_4bit`` with everything read from a ``Quant4bitState``."""
    return dequantize_4bit(
        packed, state.absmax, state.shape, state.blocksize, state.quant_type, state.dtype, state.nested
    )
