"""nf4_matmul (kernels/nf4.py) against bitsandbytes' own dequantization, on the GPU or under the
interpreter: W quantized by ``bitsandbytes.functional.quantize_4bit``, the reference
``dequantize_4bit(...)`` then x·Wdᵀ (+ bias) in float64, compared by the tolerance rule.

Both paths (decode and tiled, pinned by ``path=``), NF4 and FP4, fp32 / fp16 / bf16 x (bf16 runs
through the fp32 dot mode under the interpreter, as every kernel's does), odd N and K that cross
the tiles' edges, blocksizes 64 to 4096, double-quantized absmax, strided x, the LoRA epilogue.
"""
import functools

import pytest
import torch

from tolerance import assert_close

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from fastpeft.kernels.nf4 import GEMV_MAX_M, nf4_matmul  # noqa: E402
from fastpeft.nf4 import NestedAbsmax, dequantize_4bit, table_4bit  # noqa: E402

# (N, K, blocksize): K a multiple of blocksize; N and K not multiples of the tiles
CPU_SHAPES = [(37, 192, 64), (20, 256, 128)]
GPU_SHAPES = CPU_SHAPES + [(4096, 4096, 64), (1000, 2048, 128)]
# the large blocksizes on few rows of W (bitsandbytes' CPU quantize_4bit takes seconds at 4096)
BLOCKSIZE_SHAPES = [(5, 512, 256), (3, 2048, 1024), (1, 4096, 4096)]
CPU_ROWS = [1, 3, 17, 70]
GPU_ROWS = [1, 3, 16, 17, 64, 256, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def quant_device(kernel_device):
    """Where W is quantized: the kernels' device, once bitsandbytes can quantize 4-bit there (0.45.5,
    say, has no CPU quantize_4bit: skip by what it can do, not by its version)."""
    try:
        bnb_functional.quantize_4bit(torch.randn(2, 64, device=kernel_device), blocksize=64, quant_type="nf4")
    except Exception as error:  # noqa: BLE001 - whatever it raises, it cannot quantize here
        reason = f"this bitsandbytes cannot quantize 4-bit on {kernel_device}: {type(error).__name__}: {error}"
        pytest.skip(reason[:300])
    return kernel_device


@functools.lru_cache(maxsize=None)
def _quantize(N, K, blocksize, quant_type, device, nested=False):
    """(W's packed bytes, its QuantState, bitsandbytes' dequantized W (N, K) fp32), made once per
    argument set (read only by the tests)."""
    w = torch.randn(N, K, device=device) / K**0.5
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    return packed, state, bnb_functional.dequantize_4bit(packed, state).float()


def _nested(state):
    return (state.state2.code, state.state2.absmax, state.state2.blocksize, float(state.offset))


def _x(M, K, dtype, device, layout="contiguous"):
    if layout == "strided":  # every other column of a wider tensor
        return torch.randn(M, 2 * K, device=device, dtype=dtype)[:, ::2]
    if layout == "transposed":
        return torch.randn(K, M, device=device, dtype=dtype).t()
    return torch.randn(M, K, device=device, dtype=dtype)


def _check(x, packed, state, wd, N, K, blocksize, bias, path, nested=False, lora=None, what=""):
    dtype = x.dtype
    out = nf4_matmul(x, packed, state.absmax, state.code, N, K, blocksize, bias=bias, path=path,
                     nested=_nested(state) if nested else None, lora=lora)
    assert out.shape == (x.shape[0], N) and out.dtype == dtype, f"{what}: got {tuple(out.shape)} {out.dtype}"
    exact = x.double() @ wd.double().t()
    same = x @ wd.to(dtype).t()
    if bias is not None:
        exact, same = exact + bias.double(), same + bias
    if lora is not None:
        l, r, s = lora
        exact = exact + s * (l.double() @ r.double().t())
        same = same + s * (l.to(dtype) @ r.t())
    assert_close(out, exact, same, dtype, what)


def _paths(M):
    return ("gemv", "tiled") if M <= GEMV_MAX_M else ("tiled",)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_nf4_matmul_matches_dequantized(quant_device, quant_type, dtype):
    """Every row count on both paths; the bias on every other shape (the first has one)."""
    device = quant_device
    shapes, rows = (GPU_SHAPES, GPU_ROWS) if device == "cuda" else (CPU_SHAPES, CPU_ROWS)
    for i, (N, K, bs) in enumerate(shapes):
        packed, state, wd = _quantize(N, K, bs, quant_type, device)
        b = torch.randn(N, device=device, dtype=dtype) if i % 2 == 0 else None
        for M in rows:
            x = _x(M, K, dtype, device)
            for path in _paths(M):
                what = f"{quant_type} N={N} K={K} bs={bs} M={M} {path} bias={b is not None}"
                _check(x, packed, state, wd, N, K, bs, b, path, what=what)


@pytest.mark.parametrize("path", ["gemv", "tiled", "auto"])
def test_blocksizes(quant_device, path):
    device = quant_device
    for N, K, bs in BLOCKSIZE_SHAPES:
        packed, state, wd = _quantize(N, K, bs, "nf4", device)
        for M in (1, 3) if path != "auto" else (1, 70):
            x = _x(M, K, torch.float32, device)
            _check(x, packed, state, wd, N, K, bs, None, path, what=f"N={N} K={K} bs={bs} M={M} {path}")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("path", ["gemv", "tiled"])
def test_nested_absmax(quant_device, quant_type, path):
    """compress_statistics=True: the uint8 absmax codes rebuilt inside the kernel."""
    device = quant_device
    for N, K, bs in (CPU_SHAPES[0], (70, 512, 64)):  # 512·70/64 = 560 blocks: three absmax2 blocks of 256
        packed, state, wd = _quantize(N, K, bs, quant_type, device, nested=True)
        assert state.absmax.dtype == torch.uint8
        for M in (1, 17):
            x = _x(M, K, torch.float16, device)
            b = torch.randn(N, device=device, dtype=torch.float16)
            _check(x, packed, state, wd, N, K, bs, b, path, nested=True, what=f"nested N={N} K={K} M={M} {path}")


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("path", ["gemv", "tiled"])
def test_strided_x(quant_device, layout, path):
    device = quant_device
    N, K, bs = CPU_SHAPES[0]
    packed, state, wd = _quantize(N, K, bs, "nf4", device)
    for M in (3, 17):
        x = _x(M, K, torch.float32, device, layout)
        assert not x.is_contiguous()
        _check(x, packed, state, wd, N, K, bs, None, path, what=f"{layout} M={M} {path}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
def test_lora_epilogue(quant_device, dtype):
    """The tiled path with lora=(l, r, s): + s·l·rᵀ in lora_linear's epilogue (l fp32 as the shrink
    gives it, r in the activation dtype)."""
    device = quant_device
    N, K, bs = CPU_SHAPES[0]
    packed, state, wd = _quantize(N, K, bs, "nf4", device)
    for M, R in ((1, 4), (70, 17)):
        x = _x(M, K, dtype, device)
        lora = (torch.randn(M, R, device=device), torch.randn(N, R, device=device, dtype=dtype) / R**0.5, 0.5)
        b = torch.randn(N, device=device, dtype=dtype)
        for path in ("tiled", "auto"):
            _check(x, packed, state, wd, N, K, bs, b, path, lora=lora, what=f"lora M={M} R={R} {path}")


def _pack(codes):
    """The format by its definition: codes (N, K) in 0..15, two per byte, the first in the high nibble."""
    flat = codes.flatten().to(torch.uint8)
    return (flat[0::2] << 4) | flat[1::2]


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("path", ["gemv", "tiled"])
def test_format_by_definition(kernel_device, nested, path):
    """Packed bytes built here from random codes, no bitsandbytes quantizer, and the reference
    dequantize (fastpeft/nf4.py) as the oracle: runs where bitsandbytes cannot quantize on this device
    (0.45.5 on CPU), so every supported triton runs the kernels."""
    device = kernel_device
    N, K, bs = 37, 192, 64
    codes = torch.randint(0, 16, (N, K), device=device)
    table = table_4bit("nf4", device)
    blocks = N * K // bs
    if nested:
        q = torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=device)
        nest = NestedAbsmax(torch.randn(256, device=device), torch.rand(-(-blocks // 256), device=device), 256, 0.25)
        args, kernel_nest = q, (nest.code, nest.absmax, nest.blocksize, nest.offset)
    else:
        args, nest, kernel_nest = torch.rand(blocks, device=device) + 0.5, None, None
    packed = _pack(codes)
    wd = dequantize_4bit(packed, args, (N, K), bs, "nf4", torch.float32, nest)
    b = torch.randn(N, device=device)
    for M in (1, 17):
        x = _x(M, K, torch.float32, device)
        out = nf4_matmul(x, packed, args, table, N, K, bs, bias=b, nested=kernel_nest, path=path)
        assert_close(out, x.double() @ wd.double().t() + b.double(), x @ wd.t() + b, torch.float32,
                     f"M={M} {path}")


def test_no_rows(quant_device):
    N, K, bs = CPU_SHAPES[0]
    packed, state, _ = _quantize(N, K, bs, "nf4", quant_device)
    for path in ("gemv", "tiled"):
        out = nf4_matmul(torch.randn(0, K, device=quant_device), packed, state.absmax, state.code, N, K, bs, path=path)
        assert out.shape == (0, N)


def test_bad_input_raises(quant_device):
    device = quant_device
    N, K, bs = CPU_SHAPES[0]
    packed, state, _ = _quantize(N, K, bs, "nf4", device)
    x = torch.randn(2, K, device=device)
    with pytest.raises(NotImplementedError, match="not a multiple of blocksize"):
        nf4_matmul(torch.randn(2, 96, device=device), packed[: N * 96 // 2], state.absmax, state.code, N, 96, 64 * 2)
    with pytest.raises(ValueError, match="power of two >= 32"):
        nf4_matmul(x, packed, state.absmax, state.code, N, K, 96)
    with pytest.raises(ValueError, match="x must be"):
        nf4_matmul(torch.randn(2, K + 1, device=device), packed, state.absmax, state.code, N, K, bs)
    with pytest.raises(ValueError, match="absmax must be"):
        nf4_matmul(x, packed, state.absmax.half(), state.code, N, K, bs)
    with pytest.raises(ValueError, match="packed must be"):
        nf4_matmul(x, packed[:-1], state.absmax, state.code, N, K, bs)
    with pytest.raises(ValueError, match="bias must be"):
        nf4_matmul(x, packed, state.absmax, state.code, N, K, bs, bias=torch.randn(N + 1, device=device))
    with pytest.raises(ValueError, match="gemv path takes up to"):
        nf4_matmul(torch.randn(GEMV_MAX_M + 1, K, device=device), packed, state.absmax, state.code, N, K, bs,
                   path="gemv")
    lora = (torch.randn(2, 4, device=device), torch.randn(N, 4, device=device), 1.0)
    with pytest.raises(NotImplementedError, match="tiled path only"):
        nf4_matmul(x, packed, state.absmax, state.code, N, K, bs, lora=lora, path="gemv")
