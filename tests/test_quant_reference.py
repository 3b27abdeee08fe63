"""fastpeft's pure-PyTorch 4-bit dequantize (fastpeft/nf4.py) against bitsandbytes, bit for bit.

Weights are quantized on CPU with bitsandbytes.functional.quantize_4bit and dequantized by both sides;
the outputs must be torch.equal. bitsandbytes' CPU path accepts every blocksize fastpeft does (32, 64,
..., 4096: all eight are tested) and rejects others in quantize_4bit / dequantize_4bit (ValueError
"invalid blocksize"). bitsandbytes 0.45.5 has no CPU 4-bit path at all (quantize_4bit raises
NotImplementedError "Device type not supported for FP4 quantization: cpu", for NF4 too): the tests that
need it skip there, by capability, with that reason.

bitsandbytes 0.50.2's native CPU dequantize (taken when shape[-1] is even and, on AVX-512 machines,
blocksize < 2048) disagrees with the format when a block spans rows in some shapes (4x96 at blocksize
64, 64x128 at 256, 1x2 at any blocksize; 52 of 396 small shapes tried): its result is further from the
original weight than the format's. Its pure-PyTorch path (odd shape[-1], large blocksizes) and the
CUDA kernels follow the format. So the bit-exact comparison with the public dequantize_4bit uses
shapes the native kernel gets right (odd widths, widths of 4096 / 4100), and those row-spanning shapes
are compared with bitsandbytes' own pure-PyTorch definition (backends/default/ops.py).
"""
from __future__ import annotations

import pytest
import torch

from fastpeft import reference
from fastpeft.nf4 import BLOCKSIZES_4BIT, FP4_TABLE, NF4_TABLE, Quant4bitState, dequantize_4bit, dequantize_state

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (37, 29) and (5, 4097): odd widths; (3, 4100): blocks span rows; (2, 4096): whole rows per block.
SHAPES = [(37, 29), (5, 4097), (3, 4100), (2, 4096)]


@pytest.fixture
def bnb_4bit(request):
    """bitsandbytes.functional, skipping when this bitsandbytes cannot quantize ``quant_type`` on CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    quant_type = request.node.callspec.params.get("quant_type", "nf4")
    try:
        bnbf.quantize_4bit(torch.randn(2, 64), quant_type=quant_type)
    except (NotImplementedError, RuntimeError) as e:
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantize {quant_type} on CPU: {e}")
    return bnbf


def _quantize(bnbf, shape, dtype, blocksize, nested, quant_type, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(shape, dtype=torch.float32).to(dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return w, packed, qs


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_tables_are_bitsandbytes(quant_type):
    bnbf = pytest.importorskip("bitsandbytes.functional")  # the tables need no CPU 4-bit path
    ours = torch.tensor(NF4_TABLE if quant_type == "nf4" else FP4_TABLE, dtype=torch.float32)
    assert torch.equal(ours, bnbf.get_4bit_type(quant_type, device="cpu"))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bit_exact(bnb_4bit, quant_type, blocksize, nested, dtype, shape):
    _, packed, qs = _quantize(bnb_4bit, shape, dtype, blocksize, nested, quant_type)
    expected = bnb_4bit.dequantize_4bit(packed, qs)
    state = Quant4bitState.from_bnb(qs)
    assert state.nested is not None if nested else state.nested is None
    out = dequantize_state(packed, state)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape,blocksize", [((4, 96), 64), ((64, 128), 256), ((6, 64), 128), ((1, 2), 64)])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_row_spanning_blocks_follow_the_format(bnb_4bit, quant_type, nested, shape, blocksize):
    """Shapes bitsandbytes' native CPU kernel gets wrong: its pure-PyTorch definition, and closer to W."""
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    except ImportError:
        pytest.skip("this bitsandbytes has no pure-PyTorch 4-bit dequantize (backends.default.ops)")
    w, packed, qs = _quantize(bnb_4bit, shape, torch.float32, blocksize, nested, quant_type)
    out = dequantize_state(packed, Quant4bitState.from_bnb(qs))
    absmax = qs.absmax
    if nested:
        absmax = bnb_4bit.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = bnb_4bit.get_4bit_type(quant_type, device="cpu")
    expected = _dequantize_4bit_compute(packed.reshape(-1), absmax, code, blocksize, shape, torch.float32)
    assert torch.equal(out, expected)
    public = bnb_4bit.dequantize_4bit(packed, qs)
    assert (out - w).abs().max() <= (public - w).abs().max()


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_weight(bnb_4bit, quant_type, nested):
    """A bitsandbytes Linear4bit quantized on CPU, read through Params4bit.data and .quant_state."""
    import bitsandbytes as bnb

    torch.manual_seed(1)
    layer = bnb.nn.Linear4bit(37, 24, bias=True, compute_dtype=torch.bfloat16, quant_type=quant_type,
                              compress_statistics=nested)  # fmt: skip
    w = torch.randn(24, 37, dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested)
    layer = layer.to("cpu")  # Params4bit quantizes on its first .to(device)
    assert layer.weight.bnb_quantized
    qs = layer.weight.quant_state
    out = dequantize_state(layer.weight.data, Quant4bitState.from_bnb(qs))
    assert torch.equal(out, bnb_4bit.dequantize_4bit(layer.weight.data, qs))
    assert out.shape == (24, 37) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["p0", "p0.25"])
def test_qlora_linear_is_peft_over_bitsandbytes(bnb_4bit, dtype, dropout_p):
    """PEFT's lora.bnb.Linear4bit forward, written out: the base through bitsandbytes' dequantized W,
    the LoRA branch in the adapters' dtype cast to the base's before the sum."""
    shape = (24, 37)
    _, packed, qs = _quantize(bnb_4bit, shape, dtype, 64, True, "nf4")
    w = bnb_4bit.dequantize_4bit(packed, qs)
    torch.manual_seed(2)
    x = torch.randn(3, 5, 37, dtype=dtype)
    bias = torch.randn(24, dtype=dtype)
    a, b = torch.randn(8, 37), torch.randn(24, 8)
    out = reference.qlora_linear(x, packed, Quant4bitState.from_bnb(qs), bias, a, b, 2.0, dropout_p, seed=7)
    base = torch.nn.functional.linear(x, w, bias)
    lora = reference.lora_linear(x, None, None, a, b, 2.0, dropout_p, seed=7)  # in fp32, cast to x's dtype
    assert torch.equal(out, base + lora)


# --- bad input (no bitsandbytes needed) ---------------------------------------------------------------
def _args(**over):
    args = dict(packed=torch.zeros(32, dtype=torch.uint8), absmax=torch.ones(1), shape=(4, 16), blocksize=64,
                quant_type="nf4", dtype=torch.float32)  # fmt: skip
    args.update(over)
    return args


def test_valid_input_dequantizes():
    assert torch.equal(dequantize_4bit(**_args()), torch.full((4, 16), NF4_TABLE[0]))


@pytest.mark.parametrize(
    "over,message",
    [
        (dict(quant_type="int4"), r"quant_type must be 'nf4' or 'fp4', got 'int4'"),
        (dict(blocksize=48), r"blocksize must be a power of two in 32..4096, got 48"),
        (dict(blocksize=8192), r"blocksize must be a power of two in 32..4096, got 8192"),
        (dict(packed=torch.zeros(31, dtype=torch.uint8)), r"packed has 31 bytes, expected 32 for a weight of shape \(4, 16\)"),
        (dict(absmax=torch.ones(2)), r"absmax has 2 scales, expected 1 \(64 elements in blocks of 64\)"),
        (dict(absmax=torch.ones(1, dtype=torch.uint8)), r"absmax is uint8 \(double-quantized scales\) but no nested"),
    ],
    ids=["quant_type", "blocksize-48", "blocksize-8192", "packed-size", "absmax-count", "codes-without-nested"],
)  # fmt: skip
def test_bad_input_is_named(over, message):
    with pytest.raises(ValueError, match=message):
        dequantize_4bit(**_args(**over))


def test_importing_fastpeft_does_not_import_bitsandbytes():
    import subprocess
    import sys

    code = "import sys, fastpeft, fastpeft.reference, fastpeft.nf4; print('bitsandbytes' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
