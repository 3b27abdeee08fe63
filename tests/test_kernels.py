"""Fused LoRA kernels against fastpeft.reference (fp64 oracle), on the GPU or under the interpreter.

Every case draws fresh random data; shapes are odd (not multiples of any block size); inputs are
strided, 3-D, transposed (fan_in_fan_out); every requires_grad combination; dropout with the same
Philox mask as the reference, so forward and backward are compared exactly, not statistically.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from fastpeft import ops, reference, route
from fastpeft.kernels import dropout as dropout_kernels
from fastpeft.kernels import launch, tuning
from fastpeft.kernels.common import num_sms
from fastpeft.kernels.configs import TMA_CONFIGS
from fastpeft.kernels.grads import _grad_grid, lora_adapter_grads
from fastpeft.kernels.linear import lora_linear, lora_linear_tma, tma_ok, tma_wide
from fastpeft.kernels.shrink import lora_shrink
from fastpeft.kernels.shrink_expand import lora_shrink_expand
from tolerance import DTYPE_PAIRS, dtype_pair_id, assert_close

CPU_SHAPES = [(1, 64, 48, 4), (37, 45, 29, 5), (70, 130, 100, 17), (0, 32, 16, 4)]
GPU_SHAPES = CPU_SHAPES + [(16, 4096, 4096, 16), (300, 1000, 2000, 64), (2500, 1024, 520, 8), (777, 512, 1100, 256)]


def _make(M, K, N, R, dtype, adapter_dtype, device, bias=True, layout="contiguous", fan_in_fan_out=False):
    if layout == "strided":  # every other column of a wider tensor
        x = torch.randn(M, 2 * K, device=device, dtype=dtype)[:, ::2]
    elif layout == "3d":
        x = torch.randn(M, 1, K, device=device, dtype=dtype)
    elif layout == "transposed":
        x = torch.randn(K, M, device=device, dtype=dtype).t()
    else:
        x = torch.randn(M, K, device=device, dtype=dtype)
    w = torch.randn(K, N, device=device, dtype=dtype).t() if fan_in_fan_out else torch.randn(N, K, device=device, dtype=dtype)
    w = w / K**0.5
    b = torch.randn(N, device=device, dtype=dtype) if bias else None
    a = torch.randn(R, K, device=device, dtype=adapter_dtype) / K**0.5
    bb = torch.randn(N, R, device=device, dtype=adapter_dtype) / R**0.5
    return x, w, b, a, bb


def _grads(fn, x, w, b, a, bb, need, g):
    """Forward + backward of fn with requires_grad per ``need`` = (x, A, B); returns (y, dx, dA, dB)."""
    ins = [t.detach().clone().requires_grad_(n) for t, n in zip((x, a, bb), need)]
    y = fn(ins[0], w, b, ins[1], ins[2])
    wanted = [t for t, n in zip(ins, need) if n]
    grads = iter(torch.autograd.grad(y, wanted, g) if wanted else [])
    return [y] + [next(grads) if n else None for n in need]


def _check_against_reference(x, w, b, a, bb, scaling, p, need, dtype):
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=x.device) if p else None
    g = torch.randn(*x.shape[:-1], w.shape[0], device=x.device, dtype=dtype)

    def fused(x, w, b, a, bb):
        return ops.lora_linear(x, w, b, a, bb, scaling, p, seed)

    def ref(x, w, b, a, bb):
        return reference.lora_linear(x, w, b, a, bb, scaling, p, seed)

    def f64(t):
        return None if t is None else t.double()

    out = _grads(fused, x, w, b, a, bb, need, g)
    same = _grads(ref, x, w, b, a, bb, need, g)
    exact = _grads(ref, f64(x), f64(w), f64(b), f64(a), f64(bb), need, g.double())
    if x.numel() == 0:
        assert out[0].shape == exact[0].shape
        return
    for name, o, s, e in zip(("y", "dx", "dA", "dB"), out, same, exact):
        if e is not None:
            assert o.dtype == s.dtype, f"{name}: dtype {o.dtype}, PyTorch gives {s.dtype}"
            assert_close(o, e, s, dtype, name)


def _shapes(device):
    return GPU_SHAPES if device == "cuda" else CPU_SHAPES


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_pair_id)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_lora_linear_matches_reference(kernel_device, dtypes, p):
    dtype, adapter_dtype = dtypes
    for M, K, N, R in _shapes(kernel_device):
        x, w, b, a, bb = _make(M, K, N, R, dtype, adapter_dtype, kernel_device)
        _check_against_reference(x, w, b, a, bb, 2.0, p, (True, True, True), dtype)


@pytest.mark.parametrize("layout", ["strided", "3d", "transposed"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_layouts(kernel_device, layout, fan_in_fan_out):
    dtype = torch.float16
    x, w, b, a, bb = _make(45, 70, 33, 6, dtype, torch.float32, kernel_device, layout=layout,
                           fan_in_fan_out=fan_in_fan_out)
    _check_against_reference(x, w, b, a, bb, 0.5, 0.2, (True, True, True), dtype)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (True, True, False),
                                  (False, False, True), (False, False, False)],
                         ids=lambda n: "grad_" + "".join("xAB"[i] for i, v in enumerate(n) if v) or "none")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_requires_grad_combinations(kernel_device, need, bias):
    dtype = torch.float32
    x, w, b, a, bb = _make(29, 40, 24, 3, dtype, dtype, kernel_device, bias=bias)
    _check_against_reference(x, w, b, a, bb, 4.0, 0.3, need, dtype)


def test_split_grads_accumulate_into_dot_grad(kernel_device):
    """Enough rows that the adapter grads are split over M (partial sums into zeroed outputs): .grad
    of A and B after two backward passes is twice one pass's; the backward custom op (the
    torch.compile path) returns them too, as outputs that alias nothing (torch checks)."""
    M = 300 if kernel_device == "cpu" else 3000
    x, w, b, a, bb = _make(M, 40, 24, 3, torch.float32, torch.float32, kernel_device)
    assert _grad_grid([40, 24], M, 1, num_sms(x.device))[3] > 1
    g = torch.randn(M, 24, device=kernel_device)
    grads = []
    for fn in (ops.lora_linear, reference.lora_linear):
        a_, b_ = a.clone().requires_grad_(), bb.clone().requires_grad_()
        for _ in range(2):
            fn(x, w, b, a_, b_, 2.0, 0.0, None).backward(g)
        grads.append((a_.grad, b_.grad))
    for o, r in zip(*grads):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    xa = x @ a.t()
    _, da, db = torch.ops.fastpeft.lora_linear_backward(g, x, w, [], "dense", a, bb, xa, 2.0, 0.0, None, True, True,
                                                        True)
    torch.testing.assert_close(da, grads[1][0] / 2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, grads[1][1] / 2, rtol=1e-4, atol=1e-4)


def test_base_weight_and_bias_grads(kernel_device):
    """A trainable base (not LoRA's usual case) still gets correct dW and db."""
    x, w, b, a, bb = _make(21, 30, 18, 4, torch.float32, torch.float32, kernel_device)
    outs = []
    for fn in (ops.lora_linear, reference.lora_linear):
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = fn(x, ws, bs, a, bb, 1.5, 0.0, None)
        outs.append(torch.autograd.grad(y.square().sum(), (ws, bs)))
    for o, r in zip(*outs):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_lora_branch_without_base(kernel_device):
    x, w, b, a, bb = _make(33, 40, 24, 5, torch.float32, torch.float32, kernel_device)
    y = ops.lora_linear(x, None, None, a, bb, 2.0, 0.0, None)
    torch.testing.assert_close(y, reference.lora_linear(x, None, None, a, bb, 2.0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_output", [False, True], ids=["plain", "output_mask"])
def test_shrink_expand_accumulates_into_a_buffer(kernel_device, mask_output):
    """With ``accumulate`` the C pass adds into the given buffer (the q/k/v group's dX) and returns it;
    the result equals the plain pass plus the buffer's old values."""
    M, K, N, R = 70, 130, 100, 17
    x, _, _, a, bb = _make(M, K, N, R, torch.float16, torch.float32, kernel_device, layout="strided")
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=kernel_device)
    t, scale = reference.dropout_threshold(0.2), reference.dropout_scale(0.2)
    buf = torch.randn(M, N, device=kernel_device, dtype=torch.float16)
    old = buf.clone()
    plain, small = lora_shrink_expand(x, a, bb, None, 1.5, seed, t, scale, mask_output=mask_output)
    out, small2 = lora_shrink_expand(x, a, bb, None, 1.5, seed, t, scale, mask_output=mask_output,
                                     accumulate=buf)
    assert out is buf
    torch.testing.assert_close(small2, small)
    torch.testing.assert_close(out.float(), old.float() + plain.float(), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="accumulate must be"):
        lora_shrink_expand(x, a, bb, None, 1.5, accumulate=buf[:, :5])


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_pair_id)
@pytest.mark.parametrize("mode", ["forward", "forward_dropout", "backward_dropout"])
def test_shrink_expand_matches_reference(kernel_device, dtypes, mode):
    """lora_shrink_expand (the cuBLAS route's C pass) in both of its roles: forward (dropout on the
    input, bias) and dX (dropout mask on the output), against fp64; small M splits the columns."""
    dtype, adapter_dtype = dtypes
    p = 0.0 if mode == "forward" else 0.2
    shapes = [(1, 64, 48, 4), (37, 45, 29, 5), (70, 130, 100, 17), (5, 24, 40, 100)]
    if kernel_device == "cuda":
        shapes += [(300, 1000, 2000, 256), (2500, 1024, 520, 8), (9000, 640, 384, 16)]
    for M, K, N, R in shapes:
        x, _, b, a, bb = _make(M, K, N, R, dtype, adapter_dtype, kernel_device, layout="strided")
        seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=kernel_device) if p else None
        t, scale = reference.dropout_threshold(p), reference.dropout_scale(p)
        keep_in = keep_out = 1.0
        if mode == "forward_dropout":
            keep_in = reference.dropout_mask(seed, M, K, p, x.device).double() * scale
        elif mode == "backward_dropout":
            keep_out = reference.dropout_mask(seed, M, N, p, x.device).double() * scale
            b = None
        out, small = lora_shrink_expand(x, a, bb, b, 1.5, seed, t, scale,
                                        mask_output=mode == "backward_dropout")
        bias = 0.0 if b is None else b.double()
        small_ref = (x.double() * keep_in) @ a.double().t()
        out_ref = bias + 1.5 * (small_ref @ bb.double().t()) * keep_out
        # PyTorch in the same dtypes, as PEFT computes it (x cast to the adapters' dtype)
        small_same = ((x * keep_in.to(dtype) if mode == "forward_dropout" else x).to(adapter_dtype) @ a.t()).float()
        out_same = (1.5 * (small_same.to(adapter_dtype) @ bb.t()) * (keep_out.to(adapter_dtype) if p and b is None
                                                                      else 1.0)).to(dtype)
        if b is not None:
            out_same = out_same + b
        assert out.dtype == dtype and small.dtype == torch.float32
        assert_close(small, small_ref, small_same, dtype, f"small {M, K, N, R}")
        assert_close(out, out_ref, out_same, dtype, f"out {M, K, N, R}")


# --- dropout -------------------------------------------------------------------------------
def test_dropout_mask_matches_reference_bit_for_bit(kernel_device):
    for M, K, p in [(5, 37, 0.3), (40, 130, 0.05), (3, 8, 0.9)]:
        seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=kernel_device)
        got = dropout_kernels.dropout_mask(seed, M, K, reference.dropout_threshold(p))
        assert torch.equal(got.cpu(), reference.dropout_mask(seed.cpu(), M, K, p))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_kept_fraction(kernel_device, p):
    M, K = (1024, 1000) if kernel_device == "cuda" else (64, 200)
    seed = torch.tensor([7], dtype=torch.int64, device=kernel_device)
    keep = dropout_kernels.dropout_mask(seed, M, K, reference.dropout_threshold(p)).float().mean().item()
    sigma = (p * (1 - p) / (M * K)) ** 0.5
    assert abs(keep - (1 - p)) < 6 * sigma + 1e-4, f"kept {keep:.5f}, expected {1 - p}"


def test_dropout_reproducible_from_seed(kernel_device):
    x, w, b, a, bb = _make(20, 48, 16, 4, torch.float32, torch.float32, kernel_device)
    s1 = torch.tensor([123], dtype=torch.int64, device=kernel_device)
    s2 = torch.tensor([124], dtype=torch.int64, device=kernel_device)
    y1 = ops.lora_linear(x, w, b, a, bb, 1.0, 0.5, s1)
    assert torch.equal(y1, ops.lora_linear(x, w, b, a, bb, 1.0, 0.5, s1.clone()))
    assert not torch.equal(y1, ops.lora_linear(x, w, b, a, bb, 1.0, 0.5, s2))
    assert not torch.equal(y1, ops.lora_linear(x, w, b, a, bb, 1.0, 0.0, None))


# --- launcher errors -----------------------------------------------------------------------
def test_shape_errors_name_the_problem(kernel_device):
    x, w, b, a, bb = _make(4, 16, 8, 2, torch.float32, torch.float32, kernel_device)
    with pytest.raises(ValueError, match="lora_A"):
        ops.lora_linear(x, w, b, a[:, :8], bb, 1.0)
    with pytest.raises(ValueError, match="base weight"):
        ops.lora_linear(x, w[:, :8], b, a, bb, 1.0)
    with pytest.raises(ValueError, match="bias"):
        ops.lora_linear(x, w, b[:3], a, bb, 1.0)
    with pytest.raises(ValueError, match="lora_shrink"):
        lora_shrink(x, a[:, :3])
    xa = torch.empty(4, 2, device=kernel_device)
    seed = torch.tensor([3], dtype=torch.int64, device=kernel_device)
    with pytest.raises(ValueError, match="mask_output"):  # the mask applies to the LoRA term of the output
        lora_linear(x, w, b, xa, bb, 1.0, seed, 100, 1.1)
    with pytest.raises(ValueError, match="lora_shrink_expand"):
        lora_shrink_expand(x, a[:, :8], bb, b, 1.0)
    with pytest.raises(ValueError, match="lora_shrink_expand: bias"):
        lora_shrink_expand(x, a, bb, b[:3], 1.0)
    with pytest.raises(ValueError, match="lora_adapter_grads"):
        lora_adapter_grads(x, xa[:3], None, None, 1.0)


def test_custom_op_opcheck(kernel_device):
    """The torch.library registration (fake implementation, autograd) is consistent."""
    x, w, b, a, bb = _make(9, 16, 8, 2, torch.float32, torch.float32, kernel_device)
    args = (x.requires_grad_(), w, [], "dense", b, a.requires_grad_(), bb.requires_grad_(), 2.0, 0.0, None)
    torch.library.opcheck(torch.ops.fastpeft.lora_linear.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("gemm", ["triton", "cublas", "tma"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_main_matmul_paths(kernel_device, gemm, p, pin_config):
    """Every main-matmul path (fused Triton epilogue; cuBLAS onto a prefilled C; the persistent TMA
    matmul, which hands operands it cannot take to the cuBLAS path) matches the reference."""
    pin_config("FASTPEFT_GEMM", gemm)
    shapes = [(1, 4096, 4096, 16), (300, 1000, 2000, 64), (4100, 1024, 520, 8)] if kernel_device == "cuda" else \
        [(1, 40, 24, 3), (37, 45, 29, 5), (33, 48, 40, 6)]
    for M, K, N, R in shapes:
        for dtype, adapter_dtype in [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)]:
            x, w, b, a, bb = _make(M, K, N, R, dtype, adapter_dtype, kernel_device, fan_in_fan_out=M == 37)
            _check_against_reference(x, w, b, a, bb, 2.0, p, (True, True, True), dtype)


def test_auto_route_by_rows(pin_config):
    """The auto route: the Triton matmul below CUBLAS_MIN_M rows, cuBLAS onto a prefilled C above, the
    TMA matmul from FASTPEFT_TMA_MIN_M rows up when set (0: never) where its wide tiles apply; a bad
    FASTPEFT_GEMM is named."""
    pin_config("FASTPEFT_GEMM", None)
    pin_config("FASTPEFT_TMA_MIN_M", "4096")
    assert [route.dense_route(m) for m in (1, route.CUBLAS_MIN_M, 4095, 4096, 16384)] == \
        ["triton", "cublas", "cublas", "tma", "tma"]
    assert route.dense_route(16384, wide_tma=False) == "cublas"  # an fp16 output (narrow tiles): not TMA
    assert tma_wide(torch.bfloat16, False) and tma_wide(torch.bfloat16, True)
    assert not tma_wide(torch.float16, False)
    pin_config("FASTPEFT_TMA_CONFIG", "128,128,64,8,8,4,1,1")  # a pinned config is taken as it is
    assert tma_wide(torch.float16, False)
    pin_config("FASTPEFT_TMA_CONFIG", None)
    pin_config("FASTPEFT_GEMM", "tma")
    assert route.dense_route(16384, wide_tma=False) == "tma"  # pinned
    pin_config("FASTPEFT_GEMM", None)
    pin_config("FASTPEFT_TMA_MIN_M", "0")
    assert route.dense_route(16384) == "cublas"
    with pytest.raises(ValueError, match="FASTPEFT_TMA_MIN_M"):
        pin_config("FASTPEFT_TMA_MIN_M", "4k")
    pin_config("FASTPEFT_TMA_MIN_M", None)
    with pytest.raises(ValueError, match="FASTPEFT_GEMM"):
        pin_config("FASTPEFT_GEMM", "fast")


@pytest.mark.parametrize("gemm", ["triton", "tma"])
def test_routes_match_reference_eager_and_replayed(gpu, gemm, pin_config):
    """The Triton route (its matmul launched with PDL behind the shrink on Hopper: it starts early and
    waits before its epilogue) and the TMA route (whose repeated calls skip Triton's dispatch) give
    the reference's results, eager and replayed in a CUDA graph."""
    if gemm == "tma":
        _tma_device(gpu)
    pin_config("FASTPEFT_GEMM", gemm)
    for M, K, N, R in [(1, 4096, 4096, 16), (300, 1000, 2000, 64), (4100, 1024, 520, 8)]:
        x, w, b, a, bb = _make(M, K, N, R, torch.bfloat16, torch.float32, gpu)
        _check_against_reference(x, w, b, a, bb, 2.0, 0.1, (True, True, True), torch.bfloat16)
    x, w, b, a, bb = _make(16, 4096, 4096, 16, torch.bfloat16, torch.float32, gpu)
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.lora_linear(static, w, b, a, bb, 2.0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.lora_linear(static, w, b, a, bb, 2.0)
    for _ in range(3):
        static.copy_(torch.randn_like(static))
        graph.replay()
        torch.testing.assert_close(out, ops.lora_linear(static, w, b, a, bb, 2.0), rtol=0, atol=0)


def test_shrink_pinned_config(kernel_device, pin_config):
    """FASTPEFT_SHRINK_CONFIG (for measuring) pins the shrink's tiles, split and launch options: the
    same sums as the default's, split or not, partial or atomic, with dropout; a bad pin is named."""
    M, K, R = 37, 300, 5
    x = torch.randn(M, K, device=kernel_device, dtype=torch.float16)
    a = torch.randn(R, K, device=kernel_device, dtype=torch.float32)
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=kernel_device)
    drop = (seed, reference.dropout_threshold(0.1), reference.dropout_scale(0.1))
    want = lora_shrink(x, a), lora_shrink(x, a, *drop)
    pins = ["16,32,1,4,1", "16,64,3,4,2"] if kernel_device == "cpu" else ["32,64,1,4,3", "128,128,4,8,3"]
    for pin in pins:
        pin_config("FASTPEFT_SHRINK_CONFIG", pin)
        for d, ref in zip(((), drop), want):
            torch.testing.assert_close(lora_shrink(x, a, *d), ref, rtol=1e-4, atol=1e-4)
            parts = lora_shrink(x, a, *d, partial=True)
            assert parts.shape[0] == int(pin.split(",")[2])
            torch.testing.assert_close(parts.sum(0), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="FASTPEFT_SHRINK_CONFIG"):  # named when the switches are read
        pin_config("FASTPEFT_SHRINK_CONFIG", "64,128")


def test_tuning_switches_are_read_once(pin_config):
    """The kernels' tuning switches are parsed at first use and again only at tuning.reload() (not at
    every call); a malformed one is named."""
    pin_config(tuning.LINEAR, "16,32,32,4,4,1")
    assert tuning.pinned(tuning.LINEAR) == (16, 32, 32, 4, 4, 1) and tuning.pinned(tuning.SHRINK) is None
    os.environ[tuning.LINEAR] = "32,32,32,4,4,1"  # (pin_config restores every switch after the test)
    assert tuning.pinned(tuning.LINEAR) == (16, 32, 32, 4, 4, 1)
    pin_config(tuning.TMA, "128,256,64,16,8,3,1,true,0,1")
    assert tuning.pinned(tuning.TMA) == (128, 256, 64, 16, 8, 3, True, True, False, True)
    assert tuning.pinned(tuning.LINEAR) == (32, 32, 32, 4, 4, 1)
    for name, bad in ((tuning.SHRINK, "64,128"), (tuning.LINEAR, "16,32,x,4,4,1"), (tuning.TMA, "128,256,64,16,8,3"),
                      (tuning.MULTI_LORA_WIDE, "yes"), (tuning.MULTI_LORA_TMA, "on"), (tuning.MULTI_LORA_GROUP, "off")):
        with pytest.raises(ValueError, match=name):
            pin_config(name, bad)
        pin_config(name, None)


def test_shrink_partials_are_summed_by_the_linear(kernel_device):
    """lora_shrink(partial=True) hands its split-K partial sums (no zero-filled output) to lora_linear,
    which adds them in a fixed order in its epilogue and returns their sum: the same y and xa as the
    shrink's own sum, bit for bit from run to run."""
    M, K, N, R = 5, 600, 48, 6
    x, w, b, a, bb = _make(M, K, N, R, torch.float16, torch.float32, kernel_device)
    parts = lora_shrink(x, a, partial=True)
    assert parts.dim() == 3 and parts.shape[1:] == (M, R) and parts.shape[0] > 1
    y, xa = lora_linear(x, w, b, parts, bb, 2.0)
    torch.testing.assert_close(xa, parts.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xa, lora_shrink(x, a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, lora_linear(x, w, b, xa, bb, 2.0), rtol=1e-3, atol=1e-3)
    y2, xa2 = lora_linear(x, w, b, lora_shrink(x, a, partial=True), bb, 2.0)
    assert torch.equal(xa2, xa) and torch.equal(y2, y)
    one = lora_shrink(x[:, :100], a[:, :100], partial=True)  # one split: S = 1
    assert one.shape[0] == 1
    assert torch.equal(lora_linear(x[:, :100], w[:, :100], b, one, bb, 2.0)[1], one[0])
    empty = parts[:0]  # no partial sums at all: named, not read
    with pytest.raises(ValueError, match="S >= 1"):
        lora_linear(x, w, b, empty, bb, 2.0)
    if kernel_device == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        with pytest.raises(ValueError, match="S >= 1"):
            lora_linear_tma(x, w, b, empty, bb, 2.0)


@pytest.mark.parametrize("consumer", ["linear", "tma", "tma_halves"])
def test_shrink_partials_at_large_m(kernel_device, consumer):
    """From 512 rows the shrink splits K too, when its row blocks alone would leave multiprocessors
    idle; the pointer and the TMA matmul (its epilogue on whole tiles or on column halves) add the
    partial sums in their epilogue (every output column block, the sum kept once), with and without
    dropout on the shrink's input."""
    if consumer != "linear":
        _tma_device(kernel_device)
    M, K, N, R = (520, 1104, 24, 8) if kernel_device == "cpu" else (4100, 2056, 520, 16)
    dtype = torch.bfloat16 if consumer == "tma_halves" and kernel_device == "cuda" else torch.float16
    x, w, b, a, bb = _make(M, K, N, R, dtype, torch.float32, kernel_device)
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=kernel_device)
    t, scale = reference.dropout_threshold(0.1), reference.dropout_scale(0.1)
    halves = (16, 32, 32, 4, 4, 1, True, False, False, True) if kernel_device == "cpu" else \
        TMA_CONFIGS["sm90"]["wide_masked"]
    matmul = {"linear": lora_linear, "tma": lora_linear_tma,
              "tma_halves": lambda *args: lora_linear_tma(*args, config=halves)}[consumer]
    for drop in ((), (seed, t, scale)):
        parts = lora_shrink(x, a, *drop, partial=True)
        assert parts.shape[0] > 1, "no split at this size"
        y, xa = matmul(x, w, b, parts, bb, 2.0)
        torch.testing.assert_close(xa, parts.sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xa, lora_shrink(x, a, *drop), rtol=1e-4, atol=1e-4)
        lora = 2.0 * xa.double() @ bb.double().t()
        assert_close(y, x.double() @ w.double().t() + b.double() + lora, F.linear(x, w, b).double() + lora, dtype,
                     f"{consumer} dropout {bool(drop)}")


def _tma_device(kernel_device):
    if kernel_device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA matmul needs a Hopper or later GPU")


@pytest.mark.parametrize("epilogue", ["whole", "halves"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("form", ["forward", "fan_in_fan_out", "dx_dropout", "accumulate"])
def test_lora_linear_tma_matches_reference(kernel_device, dtype, form, epilogue):
    """lora_linear_tma against the fp64 formula: the forward form (bias, W row-major or a transposed
    view), the dX form (W's transpose view, the dropout mask on the LoRA term), and adding into a buffer;
    M, N, K not multiples of the tiles; the epilogue on the whole tile or on its two column halves."""
    _tma_device(kernel_device)
    config = None
    if epilogue == "halves":
        if kernel_device == "cuda" and dtype != torch.bfloat16:
            pytest.skip("the wide tiles take bf16 outputs")
        config = (16, 32, 32, 4, 4, 1, True, False, False, True) if kernel_device == "cpu" else \
            TMA_CONFIGS["sm90"]["wide_masked"]
    shapes = [(37, 48, 40, 5), (1, 32, 24, 3)] if kernel_device == "cpu" else \
        [(37, 48, 40, 5), (300, 1024, 2056, 64), (4100, 1032, 520, 8)]
    for M, K, N, R in shapes:
        x, w, b, a, bb = _make(M, K, N, R, dtype, torch.float32, kernel_device, fan_in_fan_out=form == "fan_in_fan_out")
        l = torch.randn(M, R, device=kernel_device)
        seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=kernel_device)
        t, scale = reference.dropout_threshold(0.2), reference.dropout_scale(0.2)
        lora = 1.5 * l.double() @ bb.double().t()
        if form == "dx_dropout":  # out = dY·W: the kernel's w is W's transpose view (K rows of N)
            dy = torch.randn(M, N, device=kernel_device, dtype=dtype)
            a_t = a.t()[:, :R]  # (K, R) view
            out = lora_linear_tma(dy, w.t(), None, l, a_t, 1.5, seed, t, scale, mask_output=True,
                                  config=config)
            keep = reference.dropout_mask(seed, M, K, 0.2, kernel_device)
            want = dy.double() @ w.double() + torch.where(keep, 1.5 * l.double() @ a_t.double().t() * scale, 0.0)
            same = (dy @ w).double() + torch.where(keep, 1.5 * l.double() @ a_t.double().t() * scale, 0.0)
        else:
            buf = torch.randn(M, N, device=kernel_device, dtype=dtype) if form == "accumulate" else None
            old = None if buf is None else buf.clone()
            out = lora_linear_tma(x, w, b, l, bb, 1.5, accumulate=buf, config=config)
            want = x.double() @ w.double().t() + b.double() + lora
            same = F.linear(x, w, b).double() + lora
            if buf is not None:
                assert out is buf
                want, same = want + old.double(), same + old.double()
        assert_close(out, want, same, dtype, f"{form} {M, K, N, R}")
        if form != "accumulate":  # the second call of a shape takes the kept kernel's direct launch
            again = (lora_linear_tma(dy, w.t(), None, l, a_t, 1.5, seed, t, scale, mask_output=True,
                                     config=config)
                     if form == "dx_dropout" else lora_linear_tma(x, w, b, l, bb, 1.5, config=config))
            torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_lora_linear_tma_direct_launch_follows_each_call(gpu, monkeypatch):
    """After its first launch a TMA plan launches the compiled kernel directly, with the descriptors
    encoded once per base pointer: new values at a kept pointer, new tensors and an output written
    into a buffer still give the formula's numbers; on this triton the direct launcher is built."""
    _tma_device(gpu)
    import triton

    built = []
    real = launch.descriptor_launcher
    monkeypatch.setattr(launch, "descriptor_launcher", lambda c, tail: built.append(real(c, tail)) or built[-1])
    M, K, N, R = 29, 80, 72, 3  # a shape no other test uses: this test builds the plan
    x, w, b, a, bb = _make(M, K, N, R, torch.bfloat16, torch.float32, gpu)
    l = torch.randn(M, R, device=gpu)
    for step in range(4):
        if step == 1:
            x.normal_()  # the kept pointer, new values
        elif step == 2:
            x = torch.randn_like(x)  # another tensor (possibly another pointer)
        elif step == 3:
            w = torch.randn_like(w)
        out = lora_linear_tma(x, w, b, l, bb, 1.5)
        lora = 1.5 * l.double() @ bb.double().t()
        assert_close(out, x.double() @ w.double().t() + b.double() + lora, F.linear(x, w, b).double() + lora,
                     torch.bfloat16, f"step {step}")
    assert len(built) == 1
    assert built[0] is not None or triton.__version__.split(".")[:2] != ["3", "6"]


def test_lora_linear_tma_takes_only_tma_operands(kernel_device):
    """tma_ok says which operands the TMA matmul takes; the launcher names what it refuses."""
    _tma_device(kernel_device)
    x, w, b, a, bb = _make(5, 48, 40, 3, torch.float16, torch.float32, kernel_device)
    l = torch.randn(5, 3, device=kernel_device)
    assert tma_ok(x, w) and tma_ok(x, w.t().contiguous().t())
    assert not tma_ok(x.float(), w.float())  # fp32
    assert not tma_ok(x, w.bfloat16())  # two dtypes
    assert not tma_ok(x[:, :45].contiguous(), w[:, :45].contiguous())  # rows not 16-byte aligned
    assert tma_ok(x[:, :45], w[:, :45])  # views of aligned rows are fine
    assert not tma_ok(torch.randn(48, 5, device=kernel_device, dtype=torch.float16).t(), w)
    assert not tma_ok(x[:1].expand(5, 48), w)  # a zero row stride (the dY of a sum)
    with pytest.raises(ValueError, match="not TMA operands"):
        lora_linear_tma(x.float(), w.float(), None, l, bb, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear_tma(x, w, None, l[:, :2], bb, 1.0)
    with pytest.raises(ValueError, match="mask_output"):
        lora_linear_tma(x, w, None, l, bb, 1.0, torch.zeros(1, dtype=torch.int64, device=kernel_device))


def test_autocast(kernel_device):
    """Under torch.autocast the fused op computes in the autocast dtype, like F.linear does."""
    dtype = torch.bfloat16 if kernel_device == "cpu" else torch.float16
    x, w, b, a, bb = _make(19, 40, 24, 4, torch.float32, torch.float32, kernel_device)
    from fastpeft import functional

    with torch.autocast(kernel_device, dtype=dtype):
        y = functional.lora_linear(x, w, b, a, bb, 2.0)
        y_ref = F.linear(x, w, b)
    assert y.dtype == y_ref.dtype == dtype
    exact = reference.lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0)
    same = reference.lora_linear(x.to(dtype), w.to(dtype), b.to(dtype), a, bb, 2.0)
    assert_close(y, exact, same, dtype, "autocast y")


def test_no_grad_saves_nothing(kernel_device):
    x, w, b, a, bb = _make(7, 16, 8, 2, torch.float32, torch.float32, kernel_device)
    a.requires_grad_()
    with torch.no_grad():
        y = ops.lora_linear(x, w, b, a, bb, 1.0, 0.0, None)
    assert y.grad_fn is None and not y.requires_grad


def test_torch_compile_traces_without_graph_breaks(kernel_device):
    """fullgraph=True fails on any graph break: the custom op and its fake implementation trace."""
    from fastpeft import functional

    x, w, b, a, bb = _make(13, 32, 16, 4, torch.float32, torch.float32, kernel_device)
    a.requires_grad_()
    bb.requires_grad_()

    def step(x, a, bb):
        return functional.lora_linear(x, w, b, a, bb, 2.0, 0.0).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if kernel_device == "cuda" else "aot_eager")
    loss = compiled(x, a, bb)
    ga, gb = torch.autograd.grad(loss, (a, bb))
    ra, rb = torch.autograd.grad(step(x, a, bb), (a, bb))
    torch.testing.assert_close(loss, step(x, a, bb))
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)


def test_int64_offsets_past_2_pow_31(gpu):
    """M·K > 2³¹ elements: row offsets must be 64-bit in every kernel (forward, dX, dA with dropout)."""
    K, N, R = 4096, 64, 4
    M = (1 << 31) // K + 17
    x = torch.randn(M, K, device=gpu, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=gpu, dtype=torch.bfloat16) / K**0.5
    a = (torch.randn(R, K, device=gpu) / K**0.5).requires_grad_()
    bb = torch.randn(N, R, device=gpu).requires_grad_()
    seed = torch.tensor([5], dtype=torch.int64, device=gpu)
    xg = x.requires_grad_()
    y = ops.lora_linear(xg, w, None, a, bb, 2.0, 0.1, seed)
    g = torch.randn_like(y)
    dx, = torch.autograd.grad(y, (xg,), g)
    tail = slice(M - 40, M)  # the rows past 2³¹ / K, checked against the reference on those rows
    x_tail = x[tail].detach().double()
    mask = reference.dropout_lanes(seed, torch.arange(M - 40, M, device=gpu), torch.arange(K // 8, device=gpu))
    keep = (mask >= reference.dropout_threshold(0.1)).double() * reference.dropout_scale(0.1)
    y_ref = x_tail @ w.double().t() + 2.0 * ((x_tail * keep) @ a.double().t()) @ bb.double().t()
    dx_ref = g[tail].double() @ w.double() + 2.0 * ((g[tail].double() @ bb.double()) @ a.double()) * keep
    assert (y[tail].double() - y_ref).norm() / y_ref.norm() < 2e-2
    assert (dx[tail].double() - dx_ref).norm() / dx_ref.norm() < 2e-2


@pytest.mark.parametrize("which", ["both", "dA", "dB", "mixed_dtypes", "split_m", "halves", "quarters"])
def test_adapter_grads_one_launch(kernel_device, which, request):
    """dA and dB from one launch (or one of them), against plain matmuls, dropout included;
    "split_m": so few columns that M is split across programs (atomics into zeroed outputs);
    "halves": enough rows that M is split in two halves, as under torch.use_deterministic_algorithms
    (bit-identical on a second run); "quarters": in four (dropout)."""
    M, K, N, R = {"split_m": (2000, 9, 8, 3), "halves": (1100, 300, 200, 5),
                  "quarters": (2100, 300, 200, 5)}.get(which, (37, 45, 29, 5))
    if which in ("halves", "quarters"):
        sms = num_sms(torch.device(kernel_device))
        assert _grad_grid([K, N], M, 1, sms, True, which == "halves")[3] == (2 if which == "halves" else 4)
        torch.use_deterministic_algorithms(which == "halves")
        request.addfinalizer(lambda: torch.use_deterministic_algorithms(False))
    x = torch.randn(M, K, device=kernel_device, dtype=torch.float16)
    dy = torch.randn(M, N, device=kernel_device, dtype=torch.float32 if which == "mixed_dtypes" else torch.float16)
    if which == "split_m":
        Cs = [K, N]
        assert _grad_grid(Cs, M, 1, num_sms(x.device))[3] > 1
    dyb = torch.randn(M, R, device=kernel_device)
    xa = torch.randn(M, R, device=kernel_device)
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=kernel_device)
    p = 0.25
    t, scale = reference.dropout_threshold(p), reference.dropout_scale(p)
    da, db = lora_adapter_grads(x if which != "dB" else None, dyb if which != "dB" else None,
                                dy if which != "dA" else None, xa if which != "dA" else None,
                                1.5, seed, t, scale)
    keep = reference.dropout_mask(seed, M, K, p, x.device).to(torch.float32)
    if which == "halves":
        again = lora_adapter_grads(x, dyb, dy, xa, 1.5, seed, t, scale)
        assert torch.equal(again[0], da) and torch.equal(again[1], db)
    if which in ("halves", "quarters"):  # separate tensors (the compile path's custom op may not alias)
        assert da.untyped_storage().data_ptr() != db.untyped_storage().data_ptr()
    if which != "dB":
        torch.testing.assert_close(da, 1.5 * scale * dyb.t() @ (x.float() * keep), rtol=1e-3, atol=1e-3)
    else:
        assert da is None
    if which != "dA":
        torch.testing.assert_close(db, 1.5 * dy.float().t() @ xa, rtol=1e-3, atol=1e-3)
    else:
        assert db is None
