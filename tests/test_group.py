"""The q/k/v projections of one input as one autograd op (fastpeft/group.py): same outputs and
gradients as the three layers alone, dropout and checkpointing included; exact for calling patterns
it does not group."""
import pytest
import torch

import fastpeft
from fastpeft import ops
from fastpeft.layer import GROUP_ATTR
from lora_helpers import train_step
from tiny_models import make_inputs, make_model


def _patched(**cfg):
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False) | cfg
    return fastpeft.patch(make_model("llama"), fastpeft.LoraConfig(**config))


def _count_groups(monkeypatch):
    calls = []
    forward = ops.LoraGroupFunction.forward
    monkeypatch.setattr(ops.LoraGroupFunction, "forward", staticmethod(lambda *a: (calls.append(1), forward(*a))[1]))
    return calls


@pytest.mark.parametrize("gemm", ["triton", "cublas"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_grouped_qkv_matches_separate_layers(kernels_on, set_options, pin_config, monkeypatch, checkpointing, gemm):
    """Grouped and ungrouped give the same logits and gradients with dropout (the seeds are drawn in
    the layers' order), one group op per attention block; on both main-matmul routes (the cuBLAS
    route's C pass adds each projection's dX into one buffer)."""
    pin_config("FASTPEFT_GEMM", gemm)
    model = _patched(lora_dropout=0.1).to(kernels_on).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = {id(m.__dict__[GROUP_ATTR][0]) for m in model.modules() if GROUP_ATTR in m.__dict__}
    assert len(groups) == 2  # two layers' q, k, v
    inputs = {k: v.to(kernels_on) for k, v in make_inputs("llama").items()}
    calls = _count_groups(monkeypatch)
    grouped = train_step(model, inputs)
    assert len(calls) == (4 if checkpointing else 2)  # recomputed in backward under checkpointing
    set_options(group_projections=False)
    alone = train_step(model, inputs)
    assert len(calls) == (4 if checkpointing else 2)
    torch.testing.assert_close(grouped[0], alone[0], rtol=1e-4, atol=1e-5)
    assert grouped[1].keys() == alone[1].keys() and len(grouped[1]) == 14 * 2
    for name in grouped[1]:
        torch.testing.assert_close(grouped[1][name], alone[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_other_calling_patterns_run_alone(kernels_on, set_options, monkeypatch):
    """k and v called on another tensor (cross-attention), an input changed in place between the
    calls, or k alone: each projection computes its own input; nothing kept is reused."""
    model = _patched().to(kernels_on).train()
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    x = torch.randn(2, 5, q.in_features, device=kernels_on, requires_grad=True)
    y = torch.randn(2, 3, q.in_features, device=kernels_on)
    set_options(group_projections=False)
    want = {name: layer(t) for name, layer, t in (("qx", q, x), ("ky", k, y), ("vy", v, y), ("kx", k, x))}
    set_options(group_projections=True)
    calls = _count_groups(monkeypatch)
    got_q, got_k, got_v = q(x), k(y), v(y)  # cross-attention: q of x, k and v of y
    assert len(calls) == 1
    torch.testing.assert_close(got_q, want["qx"])
    torch.testing.assert_close(got_k, want["ky"])
    torch.testing.assert_close(got_v, want["vy"])
    z = x.detach().clone()
    q(z)
    z.add_(1.0)  # changed in place after q: k must see the new values
    torch.testing.assert_close(k(z), k.base_layer(z) + (k.lora_B["default"](k.lora_A["default"](z)) *
                                                        k.scaling["default"]))
    assert attn.q_proj.__dict__[GROUP_ATTR][0].pending is None


def test_unpatch_removes_groups(kernels_on):
    model = _patched().to(kernels_on)
    assert any(GROUP_ATTR in m.__dict__ for m in model.modules())
    fastpeft.unpatch(model)
    assert not any(GROUP_ATTR in m.__dict__ for m in model.modules())
