"""(IA)³: kernels/ia3.py and fastpeft/ia3.py against the fp64 reference, and patch(peft_model) on PEFT
IA3 models against PEFT itself (CPU: the reference path, and the kernels under TRITON_INTERPRET=1).

Checks: the scale kernels (odd shapes, strides, dtypes); the autograd op's output, dX and dl for both
placements (input / output), both feedforward routes (scaling x below N rows, W from N rows), with
and without bias, Conv1D's transposed weight, which inputs need grad, by the tolerance rule; patched
PeftModels of llama, gpt2 (Conv1D, fan_in_fan_out) and opt: logits and every ia3_l gradient equal
the unpatched copy's, on the reference path and through the kernels; save_pretrained round trips both
ways; several active adapters; disabled / merged adapters; unpatch; errors.
"""
from __future__ import annotations

import pytest
import torch

from fastpeft import reference
from fastpeft.ia3 import ia3_linear
from tolerance import assert_close

peft = pytest.importorskip("peft")


# --- the scale kernels ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_scale_kernels_against_fp64(kernel_device, dtype, layout):
    from fastpeft.kernels.ia3 import ia3_scale, ia3_scale_backward

    R, C = 45, 137  # not multiples of the tiles
    g = torch.Generator().manual_seed(0)

    def make(shape):
        t = torch.randn(shape, generator=g).to(dtype)
        return (t.T.contiguous().T if layout == "transposed" else t).to(kernel_device)

    a, v = make((R, C)), make((R, C))
    lv = (torch.rand(C, generator=g) + 0.5).to(kernel_device)  # fp32 vector, as PEFT keeps it
    out = ia3_scale(a, lv)
    assert out.dtype == dtype and out.stride() == a.stride()
    ref = a.double() * lv.double()
    assert_close(out, ref, (a.float() * lv).to(dtype), dtype, "ia3_scale")
    dg, dl = ia3_scale_backward(a, v, lv, dtype)
    assert dg.dtype == dtype and dl.dtype == torch.float32 and dl.shape == (C,)
    assert_close(dg, ref, (a.float() * lv).to(dtype), dtype, "dg")
    ref_dl = (a.double() * v.double()).sum(0)
    assert_close(dl, ref_dl, (a.to(dtype) * v.to(dtype)).float().sum(0), dtype, "dl")
    only_dl = ia3_scale_backward(a, v, lv, dtype, need_dg=False)
    assert only_dl[0] is None and torch.equal(only_dl[1], dl)
    only_dg = ia3_scale_backward(a, a, lv, dtype, need_dl=False)
    assert only_dg[1] is None and torch.equal(only_dg[0], dg)


def test_scale_backward_many_row_blocks(kernel_device):
    """Enough rows for several row blocks per program and several programs (the partial sums)."""
    from fastpeft.kernels.ia3 import ia3_scale_backward

    g = torch.Generator().manual_seed(1)
    a, v = (torch.randn(1100, 9, generator=g).to(kernel_device) for _ in range(2))
    lv = torch.randn(9, generator=g).to(kernel_device)
    dg, dl = ia3_scale_backward(a, v, lv, torch.float32)
    torch.testing.assert_close(dl, (a.double() * v.double()).sum(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dg, a * lv, rtol=0, atol=0)


def test_scale_kernel_errors(kernel_device):
    from fastpeft.kernels.ia3 import ia3_scale, ia3_scale_backward

    a = torch.randn(4, 6, device=kernel_device)
    with pytest.raises(ValueError, match=r"scale vector must be \(6,\) for \(4, 6\) tensors, got \(4,\)"):
        ia3_scale(a, torch.ones(4, device=kernel_device))
    with pytest.raises(ValueError, match="2-D tensors of one shape"):
        ia3_scale_backward(a, torch.randn(4, 5, device=kernel_device), torch.ones(6, device=kernel_device),
                           torch.float32)
    with pytest.raises(ValueError, match="floating-point"):
        ia3_scale(a.to(torch.int32), torch.ones(6, device=kernel_device))


# --- the autograd op against the reference ------------------------------------------------------------
N, K = 24, 40
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
          (torch.bfloat16, torch.bfloat16)]


def _pair_id(pair):
    return f"{str(pair[0])[6:]}-l_{str(pair[1])[6:]}"


def _inputs(device, dtype, l_dtype, M, feedforward, bias, conv1d, x_strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, M, K * (2 if x_strided else 1), generator=g)
    x = (x[..., ::2] if x_strided else x).to(dtype)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    w = (w.T.contiguous().T if conv1d else w).to(dtype)  # Conv1D: W is the transpose view of (K, N)
    b = (torch.randn(N, generator=g) * 0.1).to(dtype) if bias else None
    lv = (torch.rand(K if feedforward else N, generator=g) + 0.5).to(l_dtype)
    dy = torch.randn(2, M, N, generator=g).to(dtype)
    return [t if t is None else t.to(device) for t in (x, w, b, lv, dy)]


def _run(fn, x, w, b, lv, dy, feedforward, need):
    x = x.detach().requires_grad_(need[0])
    lv = lv.detach().requires_grad_(need[1])
    y = fn(x, w, b, lv, feedforward)
    y.backward(dy)
    return y.detach(), x.grad, lv.grad


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["dx_dl", "dx", "dl"])
@pytest.mark.parametrize("pair", DTYPES, ids=_pair_id)
@pytest.mark.parametrize("case", [
    dict(feedforward=True, M=5, bias=True, conv1d=False, x_strided=False),    # M·2 < N: x scaled
    dict(feedforward=True, M=19, bias=False, conv1d=True, x_strided=True),    # M·2 >= N: W scaled
    dict(feedforward=False, M=7, bias=True, conv1d=True, x_strided=False),
    dict(feedforward=False, M=13, bias=False, conv1d=False, x_strided=True),
], ids=["ff_scale_x_bias", "ff_scale_w_conv1d_strided", "out_bias_conv1d", "out_strided"])
def test_ia3_linear_against_fp64(kernel_device, case, pair, need):
    dtype, l_dtype = pair
    if dtype == torch.bfloat16 and l_dtype == torch.bfloat16 and need != (True, True):
        pytest.skip("one grad combination is enough for bf16 vectors")
    feedforward = case["feedforward"]
    x, w, b, lv, dy = _inputs(kernel_device, dtype, l_dtype, case["M"], feedforward, case["bias"], case["conv1d"],
                              case["x_strided"])
    y, dx, dl = _run(ia3_linear, x, w, b, lv, dy, feedforward, need)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y_r, dx_r, dl_r = _run(reference.ia3_linear, d(x), d(w), d(b), d(lv), d(dy), feedforward, need)
    y_t, dx_t, dl_t = _run(reference.ia3_linear, x, w, b, lv, dy, feedforward, need)
    assert y.dtype == dtype
    assert_close(y, y_r, y_t, dtype, "y")
    if need[0]:
        assert dx.dtype == dtype and dx.shape == x.shape
        assert_close(dx, dx_r, dx_t, dtype, "dx")
    else:
        assert dx is None
    if need[1]:
        assert dl.dtype == l_dtype and dl.shape == lv.shape
        assert_close(dl, dl_r, dl_t, dtype, "dl")
    else:
        assert dl is None


def test_ia3_linear_no_grad_and_errors(kernel_device):
    x, w, b, lv, _ = _inputs(kernel_device, torch.float32, torch.float32, 4, True, True, False, False)
    with torch.no_grad():
        torch.testing.assert_close(ia3_linear(x, w, b, lv, True), reference.ia3_linear(x, w, b, lv, True))
    with pytest.raises(ValueError, match=r"scale vector must be \(24,\) \(output features of a 24 × 40 layer\)"):
        ia3_linear(x, w, b, lv, False)
    with pytest.raises(ValueError, match=r"base weight is \(24, 39\) but x has 40 features"):
        ia3_linear(x, w[:, 1:], b, lv, True)
