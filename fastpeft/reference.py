"""The pure-PyTorch reference path: the oracle every fastpeft kernel is tested against.

Readable in one sitting, plain autograd, no fusion. Shapes: x (..., K), weight (N, K) (a
``fan_in_fan_out`` / Conv1D weight is passed as its transpose view), lora_a (R, K), lora_b (N, R).

Dropout is defined here once, bit for bit the same as inside the kernels (kernels/dropout.py): the
keep mask of element (m, k) of the 2-D view of x comes from Philox-4x32 with ``DROPOUT_ROUNDS`` = 7
rounds, keyed by a 64-bit seed, with counter (k // 8, m, 0, 0). Each Philox call yields four 32-bit
words = eight 16-bit lanes, one per column of the 8-column group; an element is kept when its lane
is >= round(p * 65536), and kept values are scaled by 65536 / (65536 - threshold) so the expectation
is exactly x.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernels.dropout import DROPOUT_ROUNDS  # the rounds are the kernels' (the choice is explained there)
from .nf4 import NestedAbsmax, Quant4bitState, dequantize_4bit, dequantize_state  # noqa: F401 (the 4-bit format)

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
DROPOUT_GROUP = 8  # columns sharing one Philox call (4 words x 2 lanes of 16 bits)


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def dropout_threshold(p: float) -> int:
    """16-bit threshold: a lane below it is dropped."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    return min(65536, int(round(p * 65536)))


def dropout_scale(p: float) -> float:
    t = dropout_threshold(p)
    return 0.0 if t == 65536 else 65536.0 / (65536 - t)


def _seed_words(seed) -> tuple[int, int]:
    s = int(seed.reshape(-1)[0].item()) if isinstance(seed, torch.Tensor) else int(seed)
    s &= 0xFFFFFFFFFFFFFFFF
    return s & _M32, (s >> 32) & _M32


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, seed, rounds: int = DROPOUT_ROUNDS):
    """Philox-4x32 on int64 tensors holding uint32 values; counter (c0, c1, 0, 0), key = seed."""
    k0, k1 = _seed_words(seed)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        pa = c0 * _PHILOX_ROUND_A  # wraps mod 2**64: the low 64 bits, which is all we need
        pb = c2 * _PHILOX_ROUND_B
        hi_a, lo_a = (pa >> 32) & _M32, pa & _M32
        hi_b, lo_b = (pb >> 32) & _M32, pb & _M32
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_lanes(seed, rows: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """16-bit random lanes for rows x (groups * 8) columns, in the kernels' order."""
    c0 = groups.to(torch.int64)[None, :].expand(rows.numel(), -1)
    c1 = rows.to(torch.int64)[:, None].expand(-1, groups.numel())
    words = philox4x32(c0.contiguous(), c1.contiguous(), seed)

    def lo_hi(w):
        return torch.stack([w & 0xFFFF, w >> 16], dim=-1)

    u = torch.stack(
        [torch.stack([lo_hi(words[0]), lo_hi(words[1])], -1), torch.stack([lo_hi(words[2]), lo_hi(words[3])], -1)],
        -1,
    )
    return u.reshape(rows.numel(), groups.numel() * DROPOUT_GROUP)


def dropout_mask(seed, M: int, K: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep mask (M, K) of the 2-D view of x, identical to the kernels' mask."""
    rows = torch.arange(M, device=device)
    groups = torch.arange((K + DROPOUT_GROUP - 1) // DROPOUT_GROUP, device=device)
    return dropout_lanes(seed, rows, groups)[:, :K] >= dropout_threshold(p)


def dropout(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """drop(x) with fastpeft's Philox mask over the rows of x.reshape(-1, K)."""
    if p == 0.0 or seed is None:
        return x
    K = x.shape[-1]
    mask = dropout_mask(seed, x.numel() // K if K else 0, K, p, x.device).reshape(x.shape)
    return x * mask.to(x.dtype) * dropout_scale(p)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0, seed=None):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ, computed as PEFT computes it.

    The LoRA branch runs in the adapters' dtype (PEFT's autocast_adapter_dtype keeps fp32 adapters
    under a bf16/fp16 base), is added to the base output in the promoted dtype and cast back.
    ``seed`` = None means no dropout (eval mode); ``weight`` = None gives the LoRA branch alone.
    """
    xd = dropout(x.to(lora_a.dtype), dropout_p, seed)
    lora = F.linear(F.linear(xd, lora_a), lora_b) * scaling
    if weight is None:
        return lora.to(x.dtype)
    y = F.linear(x, weight, bias)
    return (y + lora).to(y.dtype)


def dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling: float, dropout_p: float = 0.0, seed=None):
    """DoRA's y as PEFT computes it (lora.Linear with use_dora; fastpeft/dora.py has the math): the
    base in x's dtype (``weight`` dense (N, K), in its own dtype), the DoRA terms in the adapters' dtype
    over W + B·A formed densely, the norm detached; with dropout (``seed``) the base product of drop(x)
    is recomputed, as PEFT does."""
    y = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).to(x.dtype)
    xl = x.to(lora_a.dtype)
    w = weight.to(xl.dtype)
    norm = torch.linalg.norm(w + scaling * (lora_b @ lora_a), dim=1).to(w.dtype).detach()
    g = (magnitude / norm).view(1, -1)
    if dropout_p > 0.0 and seed is not None:
        xl = dropout(xl, dropout_p, seed)
        base = F.linear(xl, w)
    else:
        base = y if bias is None else y - bias.to(y.dtype)
    lora = F.linear(F.linear(xl, lora_a), lora_b)
    return (y + ((g - 1) * base + g * lora * scaling)).to(y.dtype)


def qlora_linear(
    x, packed, state: Quant4bitState, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0, seed=None,
    compute_dtype=None,
):
    """QLoRA's forward as PEFT over bitsandbytes computes it: the base in ``compute_dtype`` (x's when
    None) over W dequantized from the 4-bit format in its stored dtype, cast back to x's dtype; the
    LoRA branch in the adapters' dtype, cast to that before the sum.

    ``packed`` is the 4-bit weight's bytes (``Params4bit.data``), ``state`` its
    ``Quant4bitState.from_bnb(weight.quant_state)``; W is dequantized whole here (the oracle, not the hot path).
    """
    cd = compute_dtype or x.dtype
    w = dequantize_state(packed, state).to(cd)
    y = F.linear(x.to(cd), w, None if bias is None else bias.to(cd)).to(x.dtype)
    lora = F.linear(F.linear(dropout(x.to(lora_a.dtype), dropout_p, seed), lora_a), lora_b) * scaling
    return y + lora.to(y.dtype)


def ia3_linear(x, weight, bias, scale, feedforward: bool):
    """(IA)³ over a linear layer, as PEFT's ``ia3.Linear`` computes it: weight (N, K), bias (N,) or None.

    feedforward (``scale`` (K,), on the input): y = ((x ⊙ l) in l's dtype, cast to x's)·Wᵀ + b;
    otherwise (``scale`` (N,), on the output, bias included): y = ((x·Wᵀ + b) ⊙ l), cast to its dtype.
    """
    if feedforward:
        return F.linear((x.to(scale.dtype) * scale).to(x.dtype), weight, bias)
    y = F.linear(x, weight, bias)
    return (y * scale).to(y.dtype)


def gated_act(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """h = act(g) · u of a GLU MLP (act "silu" or "gelu_tanh"), in fp32, cast to g's dtype."""
    gf = g.float()
    a = F.silu(gf) if act == "silu" else F.gelu(gf, approximate="tanh")
    return (a * u.float()).to(g.dtype)


def lora_delta_weight(lora_a, lora_b, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The merge delta s·B·A, (N, K); transposed for fan_in_fan_out (Conv1D) weights.

    Half-precision adapters on CPU are multiplied in fp32 (as PEFT does: CPU half matmul is slow and lossy).
    """
    a, b = lora_a, lora_b
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    delta = (b @ a) * scaling
    return delta.T if fan_in_fan_out else delta


def multi_lora(x, y, indices, A, B, scales, ranks):
    """A batch of many adapters, one per row (the oracle of kernels/multi_lora.py): a new tensor
    y + lora, where row i with slot s = indices[i] >= 0 gets scales[s] · x[i] · A[s, :r]ᵀ · B[s, :, :r]ᵀ,
    r = ranks[s]; rows with -1 get nothing. x (T, K), y (T, N), A (S, R, K), B (S, N, R).

    The LoRA term is computed in fp32 (fp64 when any input is fp64), added to y in that precision and
    rounded once into y's dtype."""
    ct = torch.float64 if torch.float64 in (x.dtype, y.dtype, A.dtype, B.dtype, scales.dtype) else torch.float32
    out = y.to(ct).clone()
    for s in range(A.shape[0]):
        rows = indices == s
        r = int(ranks[s])
        if r > 0 and bool(rows.any()):
            lora = x[rows].to(ct) @ A[s, :r].to(ct).T @ B[s, :, :r].to(ct).T
            out[rows] += lora * scales[s].to(ct)
    return out.to(y.dtype)
