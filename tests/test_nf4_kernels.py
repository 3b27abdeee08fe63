"""The 4-bit kernels (kernels/nf4.py: nf4_matmul's two paths, nf4_matmul_t, nf4_dequantize) against
bitsandbytes' own dequantization, on the GPU or under the interpreter: W quantized by
``bitsandbytes.functional.quantize_4bit``, dequantized, then the product in float64, compared by the
tolerance rule.

Both paths (decode and tiled, pinned by ``path=``), NF4 and FP4, fp32 / fp16 / bf16 x (bf16 runs
through the fp32 dot mode under the interpreter, as every kernel's does), odd N and K that cross
the tiles' edges, blocksizes 64 to 4096 and blocks that straddle rows, double-quantized absmax,
strided x, the LoRA epilogue, the transposed product with its dropout mask, every table lookup.
"""
import functools

import pytest
import torch

from tolerance import assert_close

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from fastpeft.kernels.nf4 import GEMV_MAX_M, nf4_dequantize, nf4_matmul, nf4_matmul_t, packed_4bit  # noqa: E402
from fastpeft.nf4 import NestedAbsmax, Quant4bitState, dequantize_4bit, dequantize_state, table_4bit  # noqa: E402

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


def _packed(packed, state, N, K, blocksize, nested=False):
    """The kernels' Packed4bit of a bitsandbytes (packed, QuantState)."""
    nest = (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset) if nested else None
    return packed_4bit(packed, state.absmax, state.code, N, K, blocksize, nest)


def _x(M, K, dtype, device, layout="contiguous"):
    if layout == "strided":  # every other column of a wider tensor
        return torch.randn(M, 2 * K, device=device, dtype=dtype)[:, ::2]
    if layout == "transposed":
        return torch.randn(K, M, device=device, dtype=dtype).t()
    return torch.randn(M, K, device=device, dtype=dtype)


def _check(x, packed, state, wd, N, K, blocksize, bias, path, nested=False, lora=None, what=""):
    dtype = x.dtype
    out = nf4_matmul(x, _packed(packed, state, N, K, blocksize, nested), bias=bias, path=path, lora=lora)
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
    """lora=(l, r, s): + s·l·rᵀ in the epilogue of both paths (l fp32 as the shrink gives it, r in the
    activation dtype); the decode path's few rows by broadcast, from 16 rows by tl.dot."""
    device = quant_device
    N, K, bs = CPU_SHAPES[0]
    packed, state, wd = _quantize(N, K, bs, "nf4", device)
    for M, R in ((1, 4), (3, 17), (17, 17), (70, 17)):
        x = _x(M, K, dtype, device)
        lora = (torch.randn(M, R, device=device), torch.randn(N, R, device=device, dtype=dtype) / R**0.5, 0.5)
        b = torch.randn(N, device=device, dtype=dtype)
        for path in _paths(M):
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
    w = packed_4bit(packed, args, table, N, K, bs, kernel_nest)
    for M in (1, 17):
        x = _x(M, K, torch.float32, device)
        out = nf4_matmul(x, w, bias=b, path=path)
        assert_close(out, x.double() @ wd.double().t() + b.double(), x @ wd.t() + b, torch.float32,
                     f"M={M} {path}")


def test_no_rows(quant_device):
    N, K, bs = CPU_SHAPES[0]
    packed, state, _ = _quantize(N, K, bs, "nf4", quant_device)
    w = _packed(packed, state, N, K, bs)
    for path in ("gemv", "tiled"):
        out = nf4_matmul(torch.randn(0, K, device=quant_device), w, path=path)
        assert out.shape == (0, N)
    assert nf4_matmul_t(torch.randn(0, N, device=quant_device), w).shape == (0, K)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
def test_blocks_across_rows(quant_device, quant_type, nested):
    """K not a multiple of the blocksize (hidden 32 with blocksize 64: every block spans two rows; K
    = 96 with 64: some do): the dequantize kernel (flat blocks), the tiled and transposed products (a
    scale read per byte); the decode path refuses them (its K steps are whole blocks). The oracle is the reference
    dequantize (the format's flat blocks): bitsandbytes 0.50.2's CPU dequantize_4bit reads such
    weights wrongly (its C kernel takes blocks per row), its CUDA one agrees with the reference."""
    device = quant_device
    for N, K, bs in ((20, 32, 64), (9, 96, 64), (5, 48, 128)):
        packed, state, _ = _quantize(N, K, bs, quant_type, device, nested=nested)
        wd = dequantize_state(packed, Quant4bitState.from_bnb(state)).float()
        w = _packed(packed, state, N, K, bs, nested)
        for M in (1, 17, 70):
            x = _x(M, K, torch.float32, device)
            _check(x, packed, state, wd, N, K, bs, None, "tiled", nested=nested, what=f"N={N} K={K} bs={bs}")
        with pytest.raises(NotImplementedError, match="multiple of the blocksize"):
            nf4_matmul(x[:1], w, path="gemv")
        assert torch.equal(nf4_dequantize(w, torch.float32), wd), f"dequantize N={N} K={K} bs={bs}"
        dy = torch.randn(17, N, device=device)
        assert_close(nf4_matmul_t(dy, w), dy.double() @ wd.double(), dy @ wd, torch.float32, f"dX N={N} K={K}")


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_dequantize_bit_exact(quant_device, nested, dtype):
    """nf4_dequantize equals bitsandbytes' dequantize_4bit bit for bit (fp32), and its rounding to the
    half types (the interpreter's fp32 -> bf16 cast may round the other way: one bf16 step there)."""
    device = quant_device
    for N, K, bs in CPU_SHAPES + [(3, 2048, 1024)]:
        packed, state, wd = _quantize(N, K, bs, "nf4", device, nested=nested)
        out = nf4_dequantize(_packed(packed, state, N, K, bs, nested), dtype)
        assert out.dtype == dtype and out.shape == (N, K)
        if dtype == torch.bfloat16 and device == "cpu":
            step = wd.abs() * 2.0**-7
            assert ((out.float() - wd).abs() <= step).all(), f"N={N} K={K} bs={bs}"
        else:
            assert torch.equal(out, wd.to(dtype)), f"N={N} K={K} bs={bs}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_transposed_product(quant_device, dtype):
    """nf4_matmul_t: dX = dY·W + s·(l·rᵀ) ⊙ keep/(1-p), the dropout mask lora_linear's dX applies
    (kernels/dropout.py), against the dequantized W."""
    from fastpeft.kernels.dropout import dropout_mask
    from fastpeft.reference import dropout_scale, dropout_threshold

    device = quant_device
    for i, (N, K, bs) in enumerate(CPU_SHAPES):
        packed, state, wd = _quantize(N, K, bs, "nf4", device, nested=i == 1)
        w = _packed(packed, state, N, K, bs, nested=i == 1)
        for M in (1, 17, 70):
            dy = _x(M, N, dtype, device, "strided" if M == 17 else "contiguous")
            out = nf4_matmul_t(dy, w)
            assert out.shape == (M, K) and out.dtype == dtype
            assert_close(out, dy.double() @ wd.double(), dy @ wd.to(dtype), dtype, f"dX N={N} K={K} M={M}")
            R, s, p = 5, 0.7, 0.25
            l, r = torch.randn(M, R, device=device), torch.randn(K, R, device=device, dtype=dtype)
            seed = torch.tensor([1234], dtype=torch.int64, device=device)
            out = nf4_matmul_t(dy, w, lora=(l, r, s), seed=seed, threshold=dropout_threshold(p),
                               drop_scale=dropout_scale(p))
            keep = dropout_mask(seed, M, K, dropout_threshold(p)).double()
            exact = dy.double() @ wd.double() + s * (l.double() @ r.double().t()) * keep / (1 - p)
            same = dy @ wd.to(dtype) + (s * (l.to(dtype) @ r.t()) * keep.to(dtype) / (1 - p)).to(dtype)
            assert_close(out, exact, same, dtype, f"dX + LoRA N={N} K={K} M={M}")


@pytest.mark.parametrize("lut", ["0", "1", "2"])
def test_lookups(quant_device, pin_config, lut):
    """Every table lookup (FASTPEFT_NF4_LUT) gives the same products."""
    pin_config("FASTPEFT_NF4_LUT", lut)
    N, K, bs = CPU_SHAPES[0]
    packed, state, wd = _quantize(N, K, bs, "fp4", quant_device)
    for M in (1, 70):
        x = _x(M, K, torch.float32, quant_device)
        for path in _paths(M):
            _check(x, packed, state, wd, N, K, bs, None, path, what=f"lut={lut} M={M} {path}")


def test_bad_input_raises(quant_device):
    device = quant_device
    N, K, bs = CPU_SHAPES[0]
    packed, state, _ = _quantize(N, K, bs, "nf4", device)
    w = _packed(packed, state, N, K, bs)
    x = torch.randn(2, K, device=device)
    with pytest.raises(ValueError, match="power of two in 32..4096"):
        packed_4bit(packed, state.absmax, state.code, N, K, 96)
    with pytest.raises(ValueError, match="K even"):
        packed_4bit(packed[: N * 95 // 2 + 1], state.absmax, state.code, N, 95, bs)
    with pytest.raises(ValueError, match="absmax must be"):
        packed_4bit(packed, state.absmax.half(), state.code, N, K, bs)
    with pytest.raises(ValueError, match="packed must be"):
        packed_4bit(packed[:-1], state.absmax, state.code, N, K, bs)
    with pytest.raises(ValueError, match="code table"):
        packed_4bit(packed, state.absmax, state.code[:8], N, K, bs)
    with pytest.raises(ValueError, match="x must be"):
        nf4_matmul(torch.randn(2, K + 1, device=device), w)
    with pytest.raises(ValueError, match="x must be"):
        nf4_matmul_t(torch.randn(2, N + 1, device=device), w)
    with pytest.raises(ValueError, match="bias must be"):
        nf4_matmul(x, w, bias=torch.randn(N + 1, device=device))
    with pytest.raises(ValueError, match="gemv path takes up to"):
        nf4_matmul(torch.randn(GEMV_MAX_M + 1, K, device=device), w, path="gemv")
    with pytest.raises(ValueError, match="lora must be"):
        nf4_matmul(x, w, lora=(torch.randn(2, 4, device=device), torch.randn(N + 1, 4, device=device), 1.0))
