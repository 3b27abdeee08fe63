"""DoRA (``use_dora=True``, fastpeft/dora.py) against PEFT's DoRA: outputs, the gradients of lora_A, lora_B
and the magnitude, adapters saved by one and loaded by the other, merge, ``patch(peft_model)``, and the
layer op (``DoraFunction``, the norm without W + s·BA) against the reference on odd and strided shapes.
The reference path everywhere; the kernels on the GPU or under TRITON_INTERPRET=1 (fp32/fp16 there).
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastpeft
from fastpeft import dora, reference
from lora_helpers import copy_peft_adapter, logits, peft_and_fastpeft, peft_state, randomize_lora_b
from tiny_models import make_inputs, make_model

peft = pytest.importorskip("peft")

DORA = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)


def _backend(request, backend):
    if backend == "kernels":
        return request.getfixturevalue("kernels_on")
    request.getfixturevalue("set_options")(backend="reference")
    return "cpu"


def _grads(model, inputs):
    """(logits, {name: grad}) of every trainable tensor after one backward of a fixed function."""
    model.zero_grad(set_to_none=True)
    out = logits(model, inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device)
    (out.float() * w).sum().backward()
    return out.detach(), {n.removeprefix("base_model.model.").replace(".default.", "."): p.grad.clone()
                          for n, p in model.named_parameters() if p.grad is not None}


def _pair(family, device, **kwargs):
    """PEFT and fastpeft DoRA models with the same non-trivial adapter (B random after init, so the
    magnitude is no longer the norm: g != 1)."""
    pm, fm = peft_and_fastpeft(make_model(family), dict(DORA, **kwargs))
    randomize_lora_b(pm)
    copy_peft_adapter(pm, fm)
    return pm.to(device).eval(), fm.to(device).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_logits_and_grads_equal_peft(family, backend, request):
    device = _backend(request, backend)
    pm, fm = _pair(family, device)
    inputs = {k: v.to(device) for k, v in make_inputs(family).items()}
    (ref, ref_grads), (got, got_grads) = _grads(pm, inputs), _grads(fm, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert set(got_grads) == set(ref_grads)
    assert any("lora_magnitude_vector" in k for k in got_grads)
    for k in ref_grads:
        torch.testing.assert_close(got_grads[k], ref_grads[k], rtol=1e-3, atol=1e-5, msg=k)


def test_magnitude_initialised_as_peft():
    base = make_model("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**DORA, init_lora_weights=False))
    fm = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**DORA, init_lora_weights=False))
    theirs = peft_state(pm)
    ours = fastpeft.peft_format.peft_state_dict(fm)
    for k in theirs:
        if "lora_A" in k or "lora_B" in k:
            with torch.no_grad():
                ours[k].copy_(theirs[k])
    fresh = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**DORA, init_lora_weights=False))
    # the magnitude of a layer is the row norm of W + s·BA at creation: recompute it from PEFT's A and B
    for name, layer in fresh.named_modules():
        if isinstance(layer, fastpeft.LoraLinear):
            key = f"base_model.model.{name}."
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(theirs[key + "lora_A.weight"])
                layer.lora_B["default"].weight.copy_(theirs[key + "lora_B.weight"])
            torch.testing.assert_close(layer._dora_norm("default"), theirs[key + "lora_magnitude_vector"])


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_dropout_in_training_kernels_equal_reference(backend, request, set_options):
    """With dropout in training DoRA's base product of drop(x) (PEFT's algorithm); the kernels' path and
    the reference path draw the same masks from the same seed."""
    device = _backend(request, backend)
    base = make_model("llama")
    fm = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**DORA, lora_dropout=0.3)).to(device).train()
    randomize_lora_b(fm)
    inputs = {k: v.to(device) for k, v in make_inputs("llama").items()}
    torch.manual_seed(1)
    got, got_grads = _grads(fm, inputs)
    set_options(backend="reference")
    torch.manual_seed(1)
    ref, ref_grads = _grads(fm, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(got_grads[k], ref_grads[k], rtol=1e-3, atol=1e-5, msg=k)
    torch.manual_seed(2)
    assert not torch.allclose(logits(fm, inputs), ref)  # a new mask each call: dropout is on


def test_adapters_both_ways_with_peft(tmp_path, set_options):
    set_options(backend="reference")
    pm, fm = _pair("llama", "cpu")
    inputs = make_inputs("llama")
    fastpeft.save_adapter(fm, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(fm, inputs), rtol=1e-5, atol=1e-6)
    pm.save_pretrained(tmp_path / "theirs")
    ours = fastpeft.load_adapter(make_model("llama"), tmp_path / "theirs")
    torch.testing.assert_close(logits(ours, inputs), logits(pm, inputs), rtol=1e-5, atol=1e-6)
    trainable = fastpeft.load_adapter(make_model("llama"), tmp_path / "theirs", is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_magnitude_vector" in n)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unmerge(family, set_options):
    set_options(backend="reference")
    pm, fm = _pair(family, "cpu")
    inputs = make_inputs(family)
    before = logits(fm, inputs)
    weights = {n: p.detach().clone() for n, p in fm.named_parameters() if "base_layer.weight" in n}
    fastpeft.merge(fm)
    torch.testing.assert_close(logits(fm, inputs), before, rtol=1e-4, atol=1e-5)
    pm.merge_adapter()
    torch.testing.assert_close(logits(pm, inputs), logits(fm, inputs), rtol=1e-4, atol=1e-5)
    fastpeft.unmerge(fm)
    for n, p in fm.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(logits(fm, inputs), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_patch_peft_dora_model(backend, request):
    device = _backend(request, backend)
    base = make_model("llama")
    pm = peft.get_peft_model(base, peft.LoraConfig(**DORA))
    randomize_lora_b(pm)
    pm = pm.to(device).eval()
    ref_model = copy.deepcopy(pm)
    inputs = {k: v.to(device) for k, v in make_inputs("llama").items()}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer left to PEFT's forward
        fastpeft.patch(pm)
    (ref, ref_grads), (got, got_grads) = _grads(ref_model, inputs), _grads(pm, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(got_grads[k], ref_grads[k], rtol=1e-3, atol=1e-5, msg=k)
    pm.add_adapter("second", peft.LoraConfig(**DORA))
    pm.base_model.set_adapter(["default", "second"])  # two DoRA adapters active: PEFT's own forward
    ref_model.add_adapter("second", peft.LoraConfig(**DORA))
    ref_model.base_model.set_adapter(["default", "second"])
    fastpeft_layers = [m for m in pm.modules() if hasattr(m, "lora_magnitude_vector")]
    for m, r in zip(fastpeft_layers, [m for m in ref_model.modules() if hasattr(m, "lora_magnitude_vector")]):
        m.load_state_dict(r.state_dict())
    torch.testing.assert_close(logits(pm, inputs), logits(ref_model, inputs), rtol=1e-4, atol=1e-5)


def test_several_active_dora_adapters_refused(set_options):
    set_options(backend="reference")
    fm = fastpeft.patch(make_model("llama"), fastpeft.LoraConfig(**DORA))
    from fastpeft.patch import set_adapter

    fastpeft.patch(fm, fastpeft.LoraConfig(**DORA), adapter_name="two")
    set_adapter(fm, ["default", "two"])
    with pytest.raises(NotImplementedError, match="DoRA for one active adapter"):
        logits(fm, make_inputs("llama"))


# --- the layer op -------------------------------------------------------------------------------
def _layer_case(M, K, N, r, dtype, device, bias=True, strided=False):
    g = torch.Generator().manual_seed(M * 7 + K)
    x = torch.randn(M, 2 * K if strided else K, generator=g).to(device, dtype)
    x = x[:, ::2] if strided else x
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    a = (torch.randn(r, K, generator=g) / K**0.5).to(device).requires_grad_(True)
    bb = (torch.randn(N, r, generator=g) * 0.1).to(device).requires_grad_(True)
    m = (torch.linalg.norm(w.float(), dim=1) * (1 + 0.1 * torch.randn(N, generator=g).to(device))).requires_grad_(True)
    return x.requires_grad_(True), w, b, a, bb, m


@pytest.mark.parametrize("M,K,N,r,dtype,bias,strided", [
    (37, 48, 40, 4, torch.float32, True, False),
    (5, 64, 96, 8, torch.float16, False, True),
    (130, 96, 72, 16, torch.float32, False, True),
])
def test_dora_op_equals_reference(M, K, N, r, dtype, bias, strided, kernels_on):
    x, w, b, a, bb, m = _layer_case(M, K, N, r, dtype, kernels_on, bias, strided)
    owner = torch.nn.Module()
    s = 1.5
    norm, _ = dora.norm_and_scale(owner, w, a, bb, m, s)
    truth = torch.linalg.norm(w.float() + s * (bb.float() @ a.float()), dim=1)
    torch.testing.assert_close(norm, truth, rtol=1e-4 if dtype == torch.float32 else 2e-3, atol=1e-5)
    got = dora.dora_linear(owner, x, w, b, a, bb, m, s, 0.0, None)
    dy = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, a, bb, m), dy)
    ref = reference.dora_linear(x, w, b, a, bb, m, s)
    ref_grads = torch.autograd.grad(ref, (x, a, bb, m), dy)
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    for name, gg, rg in zip("x A B m".split(), grads, ref_grads):
        torch.testing.assert_close(gg.float(), rg.float(), **tol, msg=name)


def test_row_norm_cache_follows_weight(kernels_on):
    x, w, b, a, bb, m = _layer_case(4, 32, 16, 4, torch.float32, kernels_on)
    owner = torch.nn.Module()
    first, _ = dora.norm_and_scale(owner, w, a, bb, m, 1.0)
    with torch.no_grad():
        w.mul_(2)  # an in-place change of the frozen weight (a merge) bumps its version
    second, _ = dora.norm_and_scale(owner, w, a, bb, m, 1.0)
    torch.testing.assert_close(second, torch.linalg.norm(w + bb.detach() @ a.detach(), dim=1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("M,N,dtype,bias,row_stride", [(37, 300, torch.float32, True, 0), (5, 17, torch.float16, False, 5),
                                                       (70, 520, torch.float16, True, 0)])
def test_scale_kernels_equal_torch(M, N, dtype, bias, row_stride, kernel_device):
    """DoRA's magnitude scale through kernels/ia3.py's column scale: y = g ⊙ z + b, dz = g ⊙ dY with
    Σ_rows dY ⊙ z."""
    from fastpeft.kernels.ia3 import ia3_scale, ia3_scale_backward

    g0 = torch.Generator().manual_seed(M + N)
    z = torch.randn(M, N + row_stride, generator=g0).to(kernel_device, dtype)[:, :N]
    dy = torch.randn(M, N + row_stride, generator=g0).to(kernel_device, dtype)[:, :N]
    g = torch.rand(N, generator=g0).to(kernel_device) + 0.5
    b = torch.randn(N, generator=g0).to(kernel_device, dtype) if bias else None
    y = ia3_scale(z, g, b)
    ref = z.float() * g + (b.float() if bias else 0)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(y, ref.to(dtype), **tol)
    dz, dg = ia3_scale_backward(dy, z, g, dtype)
    torch.testing.assert_close(dz, (dy.float() * g).to(dtype), **tol)
    torch.testing.assert_close(dg, (dy.float() * z.float()).sum(0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="ia3_scale: the scale vector must be"):
        ia3_scale(z, g[:-1], b)
    with pytest.raises(ValueError, match="ia3_scale: bias must be"):
        ia3_scale(z, g, torch.zeros(N + 1, device=kernel_device))


def test_norm_kernel_equals_torch(kernel_device):
    for M, K, N, r in ((3, 40, 70, 4), (3, 64, 300, 16), (2, 32, 33, 24)):
        x, w, b, a, bb, m = _layer_case(M, K, N, r, torch.float32, kernel_device)
        owner = torch.nn.Module()
        ref_norm, ref_g = dora.norm_and_scale(owner, w, a, bb, m, 0.7)
        norm, g = dora.norm_and_scale(owner, w, a, bb, m, 0.7, kernels=True)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)
        truth = torch.linalg.norm(w + 0.7 * (bb.detach() @ a.detach()), dim=1)
        torch.testing.assert_close(norm, truth, rtol=1e-4, atol=1e-5)
