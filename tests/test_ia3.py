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

import copy

import pytest
import torch

import fastpeft
from fastpeft import reference
from fastpeft.ia3 import ia3_linear
from lora_helpers import check_one_disabled_merged, logits
from tiny_models import make_inputs, make_model
from tolerance import assert_close, rel_err

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


# --- patch(peft_model) on PEFT IA3 models ------------------------------------------------------------
@pytest.fixture(params=["reference", "kernels"])
def backend(request, set_options):
    """The reference path, or the kernels (under the interpreter on CPU); the device."""
    if request.param == "kernels":
        return request.getfixturevalue("kernels_on")
    set_options(backend="reference")
    return "cpu"


def assert_rel(out, ref, what, tol=1e-5):
    """fp32: relative (norm-wise) error within ``tol``."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def randomize(model, seed=0):
    """Non-trivial vectors (PEFT starts them at 1): every ia3_l ~ 1 + N(0, 0.3²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)


def ia3_pair(model_type, device="cpu", dtype=torch.float32, **config):
    """(PEFT's IA3 model with PEFT's default targets, a patched deep copy of it), same vectors."""
    pm = peft.get_peft_model(make_model(model_type, dtype=dtype), peft.IA3Config(**config)).to(device)
    randomize(pm)
    fm = copy.deepcopy(pm)
    assert fastpeft.patch(fm) is fm
    return pm, fm


def inputs_on(model_type, device):
    return {k: v.to(device) for k, v in make_inputs(model_type).items()}


def forward_backward(model, inputs):
    """(logits, {name: grad}) of one forward and a backward of a fixed random projection of the logits;
    grads of every ia3_l and of the input embedding (dX through every layer)."""
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = logits(model, inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device)
    (out.float() * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_patched_ia3_equals_peft(model_type, backend, monkeypatch):
    """PEFT's default targets: llama k, v (output) and down (input); gpt2 c_attn (output) and mlp.c_proj
    (input), Conv1D; opt q, k (output) and fc2 (input)."""
    pm, fm = ia3_pair(model_type, backend)
    inputs = inputs_on(model_type, backend)
    out_p, grads_p = forward_backward(pm, inputs)
    from fastpeft import functional

    import fastpeft.ia3

    calls, ops, real, real_op = [], [], functional.ia3_linear, fastpeft.ia3.ia3_linear
    monkeypatch.setattr(functional, "ia3_linear", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    monkeypatch.setattr(fastpeft.ia3, "ia3_linear", lambda *a, **k: ops.append(1) or real_op(*a, **k))
    out_f, grads_f = forward_backward(fm, inputs)
    assert len(calls) == len(pm.base_model.targeted_module_names) and True in calls and False in calls
    assert len(ops) == (len(calls) if fastpeft.get_options().backend == "triton" else 0)  # the kernels ran
    assert_rel(out_f, out_p, "logits")
    assert set(grads_f) == set(grads_p) and sum("ia3_l" in n for n in grads_p) == len(calls)
    for name in grads_p:
        assert_rel(grads_f[name], grads_p[name], f"grad {name}")
    with torch.no_grad():
        assert not torch.allclose(logits(make_model(model_type).to(backend), inputs), out_f, atol=1e-3)


@pytest.mark.parametrize("setup", ["reference", "kernels"])
def test_bf16_ia3_by_reference_rule(setup, request, set_options):
    """bf16 base, fp32 vectors (PEFT's autocast_adapter_dtype): as close to the same model in fp32 as
    PEFT in bf16 is. Wider than the other tests (hidden 128) so the bf16 errors settle."""
    if setup == "kernels":
        device = request.getfixturevalue("kernels_on")
    else:
        device = "cpu"
        set_options(backend="reference")
    pm = peft.get_peft_model(make_model("llama", dtype=torch.bfloat16, hidden_size=128, intermediate_size=256),
                             peft.IA3Config()).to(device)
    randomize(pm)
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "ia3_l" in n)
    ref, fm = copy.deepcopy(pm).float(), copy.deepcopy(pm)
    fastpeft.patch(fm)
    inputs = inputs_on("llama", device)
    out_r, grads_r = forward_backward(ref, inputs)
    out_p, grads_p = forward_backward(pm, inputs)
    out_f, grads_f = forward_backward(fm, inputs)
    assert out_f.dtype == torch.bfloat16
    assert_close(out_f, out_r, out_p, torch.bfloat16, "logits")
    for name in grads_r:
        assert grads_f[name].dtype == grads_p[name].dtype, name
        assert_close(grads_f[name], grads_r[name], grads_p[name], torch.bfloat16, f"grad {name}")


@torch.no_grad()
def test_save_load_round_trips(tmp_path):
    pm, fm = ia3_pair("gpt2")
    inputs = make_inputs("gpt2")
    expected = logits(fm, inputs)
    fm.save_pretrained(tmp_path / "patched")
    plain = peft.PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "patched")
    assert_rel(logits(plain, inputs), expected, "PEFT loading the patched model's adapter")
    pm.save_pretrained(tmp_path / "plain")
    loaded = fastpeft.patch(peft.PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "plain"))
    assert all("forward" in m.__dict__ for n, m in loaded.named_modules() if hasattr(m, "ia3_l"))
    assert_rel(logits(loaded, inputs), expected, "patched model loading PEFT's adapter")


@torch.no_grad()
def test_several_active_disabled_merged_unpatch(backend):
    cfg = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    pm = peft.get_peft_model(make_model("llama"), peft.IA3Config(**cfg)).to(backend)
    pm.add_adapter("other", peft.IA3Config(target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"]))
    randomize(pm)
    pm.base_model.set_adapter(["default", "other"])
    fm = fastpeft.patch(copy.deepcopy(pm))
    inputs = inputs_on("llama", backend)
    assert_rel(logits(fm, inputs), logits(pm, inputs), "two active adapters (v_proj scaled by both)")
    expected = check_one_disabled_merged(pm, fm, inputs, assert_rel, lambda model: [
        m for m in model.modules() if "default" in getattr(m, "ia3_l", {})])
    with pytest.warns(UserWarning, match="inaccurate"):  # PEFT's: unmerging divides by the vectors
        fastpeft.unmerge(fm)
    assert_rel(logits(fm, inputs), expected, "unmerged")
    fm.merge_adapter()
    layer = fm.base_model.model.model.layers[0].self_attn.v_proj
    assert "forward" in layer.__dict__
    fastpeft.unpatch(fm)
    assert "forward" not in layer.__dict__
    assert_rel(logits(fm, inputs), expected, "unpatched, merged")


def test_trainable_base_gets_its_gradient(kernels_on):
    """A base weight and bias that need grad (unfrozen by hand) get PEFT's gradients: fastpeft/ia3.py
    computes no dW, so such a layer runs the reference path, never silently without dW."""
    pm = peft.get_peft_model(make_model("opt").to(kernels_on), peft.IA3Config())
    randomize(pm)
    fm = fastpeft.patch(copy.deepcopy(pm))
    for model in (pm, fm):
        layer = model.base_model.model.model.decoder.layers[0].fc2.base_layer
        layer.weight.requires_grad_(True), layer.bias.requires_grad_(True)
    inputs = inputs_on("opt", kernels_on)
    out_p, grads_p = forward_backward(pm, inputs)
    out_f, grads_f = forward_backward(fm, inputs)
    assert "base_model.model.model.decoder.layers.0.fc2.base_layer.weight" in grads_f
    assert set(grads_f) == set(grads_p)
    for name in grads_p:
        assert_rel(grads_f[name], grads_p[name], f"grad {name}")


def test_conv2d_layer_keeps_peft_forward():
    """A custom model with an IA3 Conv2d: that layer keeps PEFT's forward (one warning naming it), the
    linear one is accelerated."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5))
    pm = peft.get_peft_model(model, peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    randomize(pm)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = pm(x)
    with pytest.warns(UserWarning, match=r"1 PEFT adapter layer\(s\) keep PEFT's forward.*ia3\.layer\.Conv2d"):
        fastpeft.patch(pm)
    assert "forward" in pm.base_model.model[2].__dict__ and "forward" not in pm.base_model.model[0].__dict__
    with torch.no_grad():
        assert_rel(pm(x), expected, "outputs")


def test_model_options_pick_the_path(kernels_on, monkeypatch):
    """patch(peft_model, options=Options(backend="reference")) gives the IA3 layers the model's backend
    (the process's is the kernels here)."""
    import fastpeft.ia3

    pm = peft.get_peft_model(make_model("llama"), peft.IA3Config()).to(kernels_on)
    randomize(pm)
    fm = fastpeft.patch(copy.deepcopy(pm), options=fastpeft.Options(backend="reference"))
    monkeypatch.setattr(fastpeft.ia3, "ia3_linear", lambda *a, **k: pytest.fail("the kernels ran"))
    inputs = inputs_on("llama", kernels_on)
    with torch.no_grad():
        assert_rel(logits(fm, inputs), logits(pm, inputs), "logits")
