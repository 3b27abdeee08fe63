"""What the kernel families share: how a product runs (``dot`` and its modes, the fp32 precision),
programmatic dependent launch (PDL), the R block, pipeline stages that fit in shared memory, and the
GPU's multiprocessor count and compute capability.

Operands are cast to the activation dtype before ``tl.dot``, except that the LoRA products run in
fp32 when the adapters are fp32 (PEFT's autocast_adapter_dtype) and everything runs in fp32 under the
Triton interpreter when the data is bf16 (its bf16 ``tl.dot`` is wrong). Accumulation is always fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import INTERPRETING

try:  # programmatic dependent launch (PDL): griddepcontrol, Hopper on
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_PDL = True
except ImportError:  # pragma: no cover - an older triton: the flags that use them stay off
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


# How a tl.dot runs (a constexpr of every kernel, one per product), picked on the host:
NATIVE, FP32, SPLIT, BF16 = 0, 1, 2, 3


def dot_mode(a_dtype, b_dtype) -> int:
    """The mode of a product whose left operand ``a`` is an activation (exact in its dtype) and whose
    right operand may be fp32 (fp32 adapters, the fp32 xa / dyb):

    NATIVE  both in a's dtype (the half types, equal);   FP32  both in fp32 (``fp32_precision()``);
    SPLIT   a bf16, b fp32 split into two bf16 parts (b = hi + lo, 16 mantissa bits, relative
            error ~1e-5) — two bf16 tensor-core products instead of tf32x3's three tf32 ones.
    Under the interpreter bf16 always runs as FP32 (its bf16 tl.dot is wrong)."""
    if INTERPRETING and torch.bfloat16 in (a_dtype, b_dtype):
        return FP32
    if a_dtype == b_dtype and a_dtype != torch.float32:
        return NATIVE
    if a_dtype == torch.bfloat16 and b_dtype == torch.float32:
        return SPLIT
    return FP32


def expand_mode(out_dtype) -> int:
    """The LoRA expand (s·xa)·Bᵀ whose result is added into a bf16 output: BF16 (its rounding is the
    output's own); any other output: FP32."""
    return BF16 if out_dtype == torch.bfloat16 and not INTERPRETING else FP32


def fp32_precision() -> str:
    """Precision of the fp32 dots (fp32 adapters or activations): what torch uses for an fp32 matmul.

    Plain tf32 when torch allows tf32 matmuls; otherwise tf32x3 (three tf32 tensor-core products,
    fp32-accurate, unlike plain tf32), so fp32 adapters get the gradients PEFT's fp32 matmuls give.
    """
    return "tf32" if torch._C._get_cublas_allow_tf32() else "tf32x3"  # = torch.backends.cuda.matmul.allow_tf32


def pdl_ok(device: torch.device) -> bool:
    """Whether kernels on ``device`` may use programmatic dependent launch: a CUDA GPU of compute
    capability 9 or more (griddepcontrol) and a triton that has it; never under the interpreter."""
    return pdl_on(True) and device.type == "cuda" and device_props(device)[1] >= 9


def pdl_on(flag: bool) -> bool:
    """``flag``, where this triton has PDL and the kernels run on a GPU (not the interpreter)."""
    return flag and HAS_PDL and not INTERPRETING


def pdl_meta(pdl: bool) -> dict:
    """The launch options of a kernel that waits (``PDL_WAIT``) for the kernel before it, launched
    with programmatic dependent launch when ``pdl`` (not under the interpreter)."""
    return dict(PDL_WAIT=True, launch_pdl=True) if pdl_on(pdl) else dict(PDL_WAIT=False)


def block_r(R: int, cap: int = 256) -> int:
    """The R block: R rounded up to a power of two, at least 16 (tl.dot's smallest), at most ``cap``."""
    return max(16, min(cap, 1 << max(0, R - 1).bit_length()))


def fit_stages(stages: int, stage_bytes: int, budget: int) -> int:
    """The most pipeline stages, at most ``stages`` and at least 1, whose tiles fit in ``budget``
    bytes of shared memory (H100: 227 KiB a block, less what the kernel needs besides)."""
    return max(1, min(stages, budget // stage_bytes))


_DEVICE_PROPS: dict = {}


def device_props(device: torch.device) -> tuple:
    """(multiprocessors, compute capability major) of CUDA ``device``, asked once per device (the
    launchers read them on their hot paths)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = _DEVICE_PROPS.get(index)
    if props is None:
        p = torch.cuda.get_device_properties(index)
        props = _DEVICE_PROPS[index] = (p.multi_processor_count, p.major)
    return props


def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device``; a small fixed number under the interpreter, so that the tests
    there take the same grid-splitting branches the GPU takes."""
    if INTERPRETING or device.type != "cuda":
        return 16
    return device_props(device)[0]


@triton.jit
def dot(a, b, acc, MODE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a·b in fp32, the operands as ``MODE`` says (see dot_mode)."""
    if MODE == 1:  # FP32
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    elif MODE == 2:  # SPLIT: a exact in bf16; b = hi + lo, each bf16
        a16 = a.to(tl.bfloat16)
        hi = b.to(tl.bfloat16)
        acc = tl.dot(a16, hi, acc)
        acc = tl.dot(a16, (b - hi.to(tl.float32)).to(tl.bfloat16), acc)
    elif MODE == 3:  # BF16
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:  # NATIVE
        acc = tl.dot(a, b.to(a.dtype), acc)
    return acc
