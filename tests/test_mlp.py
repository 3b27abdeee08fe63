"""The fused GLU MLP: gated-activation kernels, the autograd op against the reference composition,
and the patched models' MLPs (what is installed, when it falls back, how much it saves)."""
import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft import mlp, ops, reference
from fastpeft.kernels import activation
from lora_helpers import train_step
from tiny_models import make_inputs, make_model
from tolerance import assert_close

ACTS = ["silu", "gelu_tanh"]


def _act_ref(g, u, dh, act):
    g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
    h = reference.gated_act(g, u, act)
    dg, du = torch.autograd.grad(h, (g, u), dh)
    return h, dg, du


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gated_act_matches_reference(kernel_device, act, dtype):
    shape = (3, 7, 301) if kernel_device == "cpu" else (5, 1000, 2731)
    g, u, dh = (torch.randn(shape, device=kernel_device, dtype=dtype) * 3 for _ in range(3))
    h = activation.gated_act(g, u, act)
    dg, du = activation.gated_act_backward(g, u, dh, act)
    exact = _act_ref(g.double(), u.double(), dh.double(), act)
    # PyTorch in the same dtype, as a transformers MLP computes it (act, then the product, each rounded)
    a = (F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh"))
    same = _act_ref(g, u, dh, act)
    same = (a * u,) + same[1:]
    for name, out, e, s in zip(("h", "dg", "du"), (h, dg, du), exact, same):
        assert out.dtype == dtype
        assert_close(out, e, s, dtype, f"{act} {name}")


def test_gated_act_backward_rebuilds_h_and_writes_dg_over_dh(kernel_device):
    """with_h gives the forward's h bit for bit; into_dh writes dg over dh and nothing else changes."""
    g, u, dh = (torch.randn(3, 701, device=kernel_device, dtype=torch.bfloat16) * 3 for _ in range(3))
    dg, du = activation.gated_act_backward(g, u, dh, "silu")
    dh2 = dh.clone()
    dg2, du2, h = activation.gated_act_backward(g, u, dh2, "silu", with_h=True, into_dh=True)
    assert dg2.data_ptr() == dh2.data_ptr()
    assert torch.equal(dg2, dg) and torch.equal(du2, du)
    assert torch.equal(h, activation.gated_act(g, u, "silu"))
    with pytest.raises(ValueError, match="of g's dtype"):
        activation.gated_act_backward(g, u, dh.float(), "silu", into_dh=True)


def test_gated_act_errors(kernel_device):
    g = torch.randn(4, 6, device=kernel_device)
    with pytest.raises(ValueError, match="not supported"):
        activation.gated_act(g, g, "relu")
    with pytest.raises(ValueError, match="contiguous and of one shape"):
        activation.gated_act(g.t(), g.t(), "silu")
    with pytest.raises(ValueError, match="contiguous and of one shape"):
        activation.gated_act_backward(g, g, g[:2], "silu")


def _projections(H, I, dtype, adapter_dtype, device, bias, ps, R=(4, 5, 3)):
    shapes = [(I, H), (I, H), (H, I)]
    out = []
    for (n, k), r, p in zip(shapes, R, ps):
        w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
        b = torch.randn(n, device=device, dtype=dtype) if bias else None
        a = torch.randn(r, k, device=device, dtype=adapter_dtype) / k**0.5
        bb = torch.randn(n, r, device=device, dtype=adapter_dtype) / r**0.5
        out.append((w, b, a, bb, 1.5, p))
    return out


def _mlp_ref(x, projections, act, seeds):
    (gw, gbias, ga, gb, gs, gp), (uw, ubias, ua, ub, us, up), (dw, dbias, da, db, ds, dp) = projections
    g = reference.lora_linear(x, gw, gbias, ga, gb, gs, gp, seeds[0])
    u = reference.lora_linear(x, uw, ubias, ua, ub, us, up, seeds[1])
    return reference.lora_linear(reference.gated_act(g, u, act), dw, dbias, da, db, ds, dp, seeds[2])


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float16)], ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("ps", [(0.0, 0.0, 0.0), (0.1, 0.0, 0.2)], ids=["p0", "dropout"])
def test_lora_mlp_matches_reference(kernels_on, act, dtypes, ps):
    dtype, adapter_dtype = dtypes
    H, I, shape = (40, 72, (3, 7)) if kernels_on == "cpu" else (1000, 2600, (2, 1500))
    projections = _projections(H, I, dtype, adapter_dtype, kernels_on, bias=True, ps=ps)
    seeds = [torch.randint(-(2**63), 2**63 - 1, (1,), device=kernels_on) if p else None for p in ps]
    x = torch.randn(*shape, H, device=kernels_on, dtype=dtype)
    g = torch.randn(*shape, H, device=kernels_on, dtype=dtype)

    def run(fn, x, projections):
        x = x.detach().clone().requires_grad_()
        leaves = [x]
        prepared = []
        for w, b, a, bb, s, p in projections:
            a, bb = a.detach().clone().requires_grad_(), bb.detach().clone().requires_grad_()
            leaves += [a, bb]
            prepared.append((w, b, a, bb, s, p))
        y = fn(x, prepared)
        return [y] + list(torch.autograd.grad(y, leaves, g.to(y.dtype)))

    out = run(lambda x, pr: ops.lora_mlp(x, act, pr, seeds), x, projections)
    same = run(lambda x, pr: _mlp_ref(x, pr, act, seeds), x, projections)
    f64 = [tuple(t.double() if isinstance(t, torch.Tensor) else t for t in proj) for proj in projections]
    exact = run(lambda x, pr: _mlp_ref(x, pr, act, seeds), x.double(), f64)
    names = ["y", "dx", "gate dA", "gate dB", "up dA", "up dB", "down dA", "down dB"]
    for name, o, s, e in zip(names, out, same, exact):
        assert o.dtype == s.dtype, f"{name}: {o.dtype} vs {s.dtype}"
        assert_close(o, e, s, dtype, name)


def test_lora_mlp_shape_errors(kernel_device):
    projections = _projections(16, 24, torch.float32, torch.float32, kernel_device, bias=False, ps=(0, 0, 0))
    x = torch.randn(3, 16, device=kernel_device)
    up = list(projections[1])
    up[0] = up[0][:20]  # up's weight (20, 16) against gate's (24, 16)
    up[3] = up[3][:20]
    with pytest.raises(ValueError, match="GLU MLP weights do not fit"):
        ops.lora_mlp(x, "silu", [projections[0], tuple(up), projections[2]], [None] * 3)
    with pytest.raises(ValueError, match="lora_A"):  # an adapter of the wrong width
        ops.lora_mlp(x[:, :8], "silu", projections, [None] * 3)


def _patched(family="llama", **cfg):
    model = make_model(family)
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False) | cfg
    return fastpeft.patch(model, fastpeft.LoraConfig(**config))


@pytest.mark.parametrize("family", ["llama", "gemma"])  # silu and gelu_tanh
def test_patched_model_runs_the_fused_mlp(kernels_on, family, monkeypatch):
    """Fused and unfused MLP give the same outputs and gradients, dropout included (the fused op
    draws its three seeds as the three layers would)."""
    model = _patched(family, lora_dropout=0.1).to(kernels_on).train()
    mlps = [m for m in model.modules() if mlp.FUSED_MLP_ATTR in m.__dict__]
    assert len(mlps) == 2
    inputs = {k: v.to(kernels_on) for k, v in make_inputs(family).items()}
    calls = []
    forward = ops.LoraMLPFunction.forward
    monkeypatch.setattr(ops.LoraMLPFunction, "forward", staticmethod(lambda *a: (calls.append(1), forward(*a))[1]))
    fused = train_step(model, inputs)
    assert len(calls) == 2
    fastpeft.set_options(fuse_mlp=False)
    plain = train_step(model, inputs)
    assert len(calls) == 2
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-5)
    assert fused[1].keys() == plain[1].keys() and len(fused[1]) == 14 * 2
    for name in fused[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_mlp_saves_less_than_three_layers(kernels_on, monkeypatch):
    """What autograd keeps for the MLP: x, g, u (+ small) fused; x, g, act(g), u, h unfused."""
    model = _patched("llama").to(kernels_on).train()
    layer_mlp = model.model.layers[0].mlp
    x = torch.randn(2, 7, 32, device=kernels_on, requires_grad=True)

    params = {p.data_ptr() for p in model.parameters()}

    def saved_bytes():  # activation memory: distinct saved tensors that are not parameters, by storage
        storages = {}

        def pack(t):
            if t.data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer_mlp(x)
        return sum(n for n in storages.values() if n >= 2 * 7 * 32 * 4)  # the (tokens x features) ones

    fused = saved_bytes()
    fastpeft.set_options(fuse_mlp=False)
    plain = saved_bytes()
    x_bytes, big = 2 * 7 * 32 * 4, 2 * 7 * 64 * 4  # x, and one (tokens x intermediate) fp32 tensor
    assert fused == x_bytes + 2 * big, (fused, plain)  # x, g, u
    assert plain == x_bytes + 4 * big, (fused, plain)  # x, g, act(g), u, h


def test_fused_mlp_falls_back(kernels_on):
    model = _patched("llama").to(kernels_on)
    layer_mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, device=kernels_on)
    assert mlp.fusable(layer_mlp, x) is not None
    with torch.no_grad():
        assert mlp.fusable(layer_mlp, x) is None
    fastpeft.merge(model)
    assert mlp.fusable(layer_mlp, x) is None  # merged adapters: the base layers compute
    fastpeft.unmerge(model)
    layer_mlp.up_proj.enable_adapters(False)
    assert mlp.fusable(layer_mlp, x) is None
    layer_mlp.up_proj.enable_adapters(True)
    layer_mlp.down_proj.base_layer.weight.requires_grad_(True)
    assert mlp.fusable(layer_mlp, x) is None  # a trainable base needs dW: the layers compute it
    layer_mlp.down_proj.base_layer.weight.requires_grad_(False)
    fastpeft.unpatch(model)
    assert "forward" not in layer_mlp.__dict__ and mlp.FUSED_MLP_ATTR not in layer_mlp.__dict__


def test_only_mlps_with_three_lora_projections_are_fused():
    model = _patched("llama", target_modules=["q_proj", "gate_proj", "up_proj"])
    assert not any(mlp.FUSED_MLP_ATTR in m.__dict__ for m in model.modules())
    model = _patched("phi3")  # gate_up_proj in one matrix: not the LlamaMLP pattern
    assert not any(mlp.FUSED_MLP_ATTR in m.__dict__ for m in model.modules())


def test_peft_model_gets_the_fused_mlp(kernels_on):
    peft = pytest.importorskip("peft")
    model = make_model("llama")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False))
    fastpeft.patch(pm)
    layer_mlp = pm.base_model.model.model.layers[0].mlp
    assert mlp.fusable(layer_mlp.to(kernels_on), torch.randn(1, 32, device=kernels_on)) is not None
    fastpeft.unpatch(pm)
    assert mlp.FUSED_MLP_ATTR not in layer_mlp.__dict__
