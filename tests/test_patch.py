"""fastpeft.patch / unpatch / merge against PEFT on tiny random models (CPU, reference path).

Checks: default and configured target matching equals PEFT's; logits and the gradients of every
lora_A / lora_B and of the input embedding equal PEFT's (fp32 closely; bf16 by the flash-attention
rule against an fp32 reference); patch(peft_model) keeps outputs, grads, save_pretrained and
merge_and_unload; merge / unmerge / unpatch; trainable flags; dtypes; dropout; a second adapter; tiny Falcon
included (FalconLinear: an nn.Linear subclass with nn.Linear's forward).
"""
from __future__ import annotations

import copy
import importlib
import os
import sys

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.layer import LoraLinear
from lora_helpers import copy_peft_adapter, forward_backward, logits, lora_module_names, peft_and_fastpeft
from tiny_models import MODEL_TYPES, TINY_MODELS, make_inputs, make_model
from tolerance import assert_close, rel_err

peft = pytest.importorskip("peft")

@pytest.fixture(autouse=True)
def _reference_backend(set_options):
    """These tests check the integration; the kernels have their own tests (test_kernels.py)."""
    set_options(backend="reference")


EXPLICIT_TARGETS = {"phi3": ["qkv_proj", "o_proj"]}  # PEFT has no default for phi3


def assert_fp32_close(out, ref, what, tol=1e-5):
    """fp32: relative (norm-wise) error below ``tol``; summation order may differ from PEFT's."""
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def targets_for(model_type):
    return EXPLICIT_TARGETS.get(model_type)


# --- target matching --------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_default_targets_match_peft(model_type):
    base = make_model(model_type)
    cfg = dict(target_modules=targets_for(model_type))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    fm = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    assert lora_module_names(fm) == set(pm.base_model.targeted_module_names)
    assert lora_module_names(fm), "nothing was targeted"
    spec_targets = TINY_MODELS[model_type].default_targets
    if spec_targets is not None:
        assert fm.fastpeft_config["default"].target_modules == set(spec_targets)


MATCHING_CASES = {
    "regex": dict(target_modules=r".*\.(q_proj|down_proj)"),
    "list_suffix": dict(target_modules=["self_attn.k_proj", "up_proj"]),
    "all_linear": dict(target_modules="all-linear"),
    "exclude_list": dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"]),
    "exclude_regex": dict(target_modules=["q_proj", "v_proj"], exclude_modules=r"model\.layers\.0\..*"),
    "layers_to_transform": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "layers_int": dict(target_modules=["q_proj"], layers_to_transform=0),
    "layers_pattern": dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "modules_to_save_excluded": dict(target_modules="all-linear", modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", list(MATCHING_CASES))
def test_target_matching_equals_peft(case):
    base = make_model("llama")
    cfg = MATCHING_CASES[case]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    fm = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    assert lora_module_names(fm) == set(pm.base_model.targeted_module_names)
    # the stored (and saved) target_modules are PEFT's resolved form
    assert fm.fastpeft_config["default"].target_modules == pm.peft_config["default"].target_modules


@pytest.mark.parametrize("case", ["all_linear", "seq_cls_all_linear", "gpt2_all_linear_25_layers"])
def test_all_linear_exclusions_equal_peft(case):
    if case == "all_linear":
        base, cfg = make_model("gpt2"), dict(target_modules="all-linear")
    elif case == "seq_cls_all_linear":
        base, cfg = make_model("bert", head="seq_cls"), dict(target_modules="all-linear", task_type="SEQ_CLS")
    else:  # >= 20 targets: PEFT condenses target_modules into suffixes
        base, cfg = make_model("gpt2", n_layer=6), dict(target_modules="all-linear")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    fm = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    assert lora_module_names(fm) == set(pm.base_model.targeted_module_names)
    assert fm.fastpeft_config["default"].target_modules == pm.peft_config["default"].target_modules
    assert fm.fastpeft_config["default"].modules_to_save == pm.peft_config["default"].modules_to_save


# --- nn.Linear subclasses ---------------------------------------------------------------------
def test_linear_equivalent_names_missing_from_transformers(monkeypatch):
    """Names of LINEAR_EQUIVALENT_CLASSES absent from the installed transformers are skipped, not imported."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    from fastpeft import models

    gone = "transformers.models.gone_model.modeling_gone_model"
    monkeypatch.setattr(models, "LINEAR_EQUIVALENT_CLASSES", (
        f"{gone}.GoneLinear", "transformers.models.falcon.modeling_falcon.NoSuchLinear", *models.LINEAR_EQUIVALENT_CLASSES))
    assert models.has_linear_forward(FalconLinear) and models.has_linear_forward(nn.Linear)
    assert gone not in sys.modules


# --- numerics vs PEFT ---------------------------------------------------------------------------
def _numeric_config(model_type, targets="all-linear"):
    """r=4 adapters with B != 0 on ``targets`` (None: PEFT's defaults), or phi3's explicit targets."""
    return dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets_for(model_type) or targets)


# Falcon also with its default targets: its FalconLinear layers (nn.Linear subclasses) either way.
@pytest.mark.parametrize("model_type,targets", [(m, "all-linear") for m in MODEL_TYPES] + [("falcon", None)],
                         ids=[f"{m}-all_linear" for m in MODEL_TYPES] + ["falcon-defaults"])
def test_fp32_logits_and_grads_equal_peft(model_type, targets):
    base = make_model(model_type)
    inputs = make_inputs(model_type)
    pm, fm = peft_and_fastpeft(base, _numeric_config(model_type, targets))
    out_p, grads_p = forward_backward(pm, inputs)
    out_f, grads_f = forward_backward(fm, inputs)
    assert set(grads_p) == set(grads_f) and len(grads_f) > 1
    assert_fp32_close(out_f, out_p, "logits")
    for name in grads_p:
        assert_fp32_close(grads_f[name], grads_p[name], f"grad {name}")
    # the adapter is not a no-op
    with torch.no_grad():
        assert not torch.allclose(logits(base, inputs), out_f, atol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_bf16_logits_and_grads_by_reference_rule(model_type):
    base16 = make_model(model_type, dtype=torch.bfloat16)
    inputs = make_inputs(model_type)
    pm16, fm16 = peft_and_fastpeft(base16, _numeric_config(model_type))
    ref = copy.deepcopy(pm16).float()  # the same weights in fp32: the reference
    for _, p in fm16.named_parameters():
        if "lora_" in _:
            assert p.dtype == torch.float32, "adapters stay fp32 under a bf16 base (autocast_adapter_dtype)"
    out_r, grads_r = forward_backward(ref, inputs)
    out_p, grads_p = forward_backward(pm16, inputs)
    out_f, grads_f = forward_backward(fm16, inputs)
    assert out_f.dtype == out_p.dtype == torch.bfloat16
    assert_close(out_f, out_r, out_p, torch.bfloat16, f"{model_type} logits")
    for name in grads_r:
        assert grads_f[name].dtype == grads_p[name].dtype, name
        assert_close(grads_f[name], grads_r[name], grads_p[name], torch.bfloat16, f"{model_type} grad {name}")


# --- patch(peft_model) --------------------------------------------------------------------------
def _count_fastpeft_calls(monkeypatch):
    import fastpeft.functional as functional

    calls = {"n": 0}
    real = functional.lora_linear

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "lora_linear", counting)
    return calls


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "falcon"])
def test_patch_peft_model_same_numbers_and_save(model_type, tmp_path, monkeypatch):
    base = make_model(model_type)
    inputs = make_inputs(model_type)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    out0, grads0 = forward_backward(pm, inputs)
    pm.save_pretrained(tmp_path / "before")

    calls = _count_fastpeft_calls(monkeypatch)
    assert fastpeft.patch(pm) is pm
    out1, grads1 = forward_backward(pm, inputs)
    assert calls["n"] == len(pm.base_model.targeted_module_names), "the PEFT layers did not run fastpeft's forward"
    assert_fp32_close(out1, out0, "logits")
    for name in grads0:
        assert_fp32_close(grads1[name], grads0[name], f"grad {name}")

    assert fastpeft.patch(pm) is pm  # a second call is a no-op
    pm.save_pretrained(tmp_path / "after")
    from safetensors.torch import load_file

    before = load_file(tmp_path / "before" / "adapter_model.safetensors")
    after = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)

    # adapter_names= mixed batches fall back to PEFT's forward
    pm.eval()
    with torch.no_grad():
        mixed = logits(pm, dict(inputs, adapter_names=["default", "__base__"]))
        torch.testing.assert_close(mixed[0], out0[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[1], logits(base, inputs)[1], rtol=1e-5, atol=1e-5)

    merged = pm.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, inputs), out0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_patch_peft_model_mixed_batch_equals_peft(backend, request):
    """PEFT's adapter_names= (one adapter per row) on a patched PeftModel gives PEFT's numbers, with
    gradients on or off: PEFT hands the names to its layers through pre-hooks, so the layers run PEFT's
    forward for that call, and the fused MLP (which would skip the layers' hooks) steps aside."""
    device = request.getfixturevalue("kernels_on") if backend == "kernels" else "cpu"
    base = make_model("llama").to(device)
    cfg = dict(init_lora_weights=False, target_modules="all-linear")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **cfg), adapter_name="sql")
    pm.add_adapter("math", peft.LoraConfig(r=2, **cfg))
    pm.eval()
    inputs = {k: v.to(device) for k, v in make_inputs("llama", batch=4).items()}
    mixed = dict(inputs, adapter_names=["sql", "__base__", "math", "sql"])
    generate = dict(mixed, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        expected, expected_tokens = logits(pm, mixed), pm.generate(**generate)
        torch.testing.assert_close(expected[1], logits(base, inputs)[1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected[0], expected[2], atol=1e-3)  # rows really got different adapters
    fastpeft.patch(pm)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(logits(pm, mixed).detach(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(pm.generate(**generate), expected_tokens)


def test_patch_peft_model_unpatch_restores_peft_forward(monkeypatch):
    pm = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, init_lora_weights=False))
    fastpeft.patch(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert "forward" in layer.__dict__
    fastpeft.unpatch(pm)
    assert "forward" not in layer.__dict__
    calls = _count_fastpeft_calls(monkeypatch)
    with torch.no_grad():
        pm(**make_inputs("llama"))
    assert calls["n"] == 0


def test_patch_peft_model_leaves_lora_bias_layers_with_warning():
    base = make_model("llama")
    inputs = make_inputs("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_bias=True, init_lora_weights=False))
    with torch.no_grad():
        ref = logits(pm, inputs)
    with pytest.warns(UserWarning, match=r"keep PEFT's forward.*q_proj.*lora_bias"):
        fastpeft.patch(pm)
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, inputs), ref, rtol=0, atol=0)


@torch.no_grad()
def test_merge_unmerge_on_peft_model():
    base = make_model("gpt2")
    inputs = make_inputs("gpt2")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    ref = logits(pm, inputs)
    fastpeft.patch(pm)
    fastpeft.merge(pm)
    from fastpeft.model_state import lora_layers

    assert all(layer.merged for _, layer in lora_layers(pm))
    torch.testing.assert_close(logits(pm, inputs), ref, rtol=1e-5, atol=1e-5)
    fastpeft.unmerge(pm)
    torch.testing.assert_close(logits(pm, inputs), ref, rtol=1e-5, atol=1e-5)


def test_patch_transformers_integrated_peft_layers(monkeypatch):
    """transformers' model.add_adapter(peft_config) injects PEFT layers without a PeftModel."""
    base = make_model("llama")
    inputs = make_inputs("llama")
    model = copy.deepcopy(base)
    try:
        model.add_adapter(peft.LoraConfig(r=4, init_lora_weights=False))
    except ValueError as e:  # transformers >= 5.24 asks for a PEFT newer than any released (0.21.2)
        if "version of PEFT" not in str(e):
            raise
        pytest.skip(f"transformers' PEFT integration refuses the installed peft {peft.__version__}: {e}")
    out0, grads0 = forward_backward(model, inputs)
    calls = _count_fastpeft_calls(monkeypatch)
    assert fastpeft.patch(model) is model
    out1, grads1 = forward_backward(model, inputs)
    assert calls["n"] == 4  # q_proj and v_proj of 2 layers
    assert_fp32_close(out1, out0, "logits")
    for name in grads0:
        assert_fp32_close(grads1[name], grads0[name], f"grad {name}")
    with pytest.raises(TypeError, match="already a PEFT LoRA layer"):
        from fastpeft.targets import check_wrappable

        check_wrappable("model.layers.0.self_attn.q_proj", model.model.layers[0].self_attn.q_proj)
    fastpeft.unpatch(model)
    assert "forward" not in model.model.layers[0].self_attn.q_proj.__dict__


def test_trainer_step_on_patched_peft_model(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Tokens(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            ids = torch.arange(2 + i, 12 + i)
            return {"input_ids": ids, "labels": ids}

    pm = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, init_lora_weights=False))
    fastpeft.patch(pm)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")
    Trainer(model=pm, args=args, train_dataset=Tokens()).train()
    changed = {k for k, v in pm.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    pm.save_pretrained(tmp_path / "adapter")
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


def test_patch_peft_model_rejects_config():
    pm = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4))
    with pytest.raises(ValueError, match="takes no lora_config"):
        fastpeft.patch(pm, fastpeft.LoraConfig())


def test_patch_peft_model_disable_adapter_context():
    base = make_model("llama")
    inputs = make_inputs("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, init_lora_weights=False))
    fastpeft.patch(pm)
    with torch.no_grad(), pm.disable_adapter():
        torch.testing.assert_close(logits(pm, inputs), logits(base, inputs), rtol=0, atol=0)


# --- merge / unmerge / unpatch ------------------------------------------------------------------
@pytest.fixture
def patched_llama():
    base = make_model("llama")
    model = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    return base, model, make_inputs("llama")


@torch.no_grad()
def test_merge_unmerge_unpatch_equal_unmerged(patched_llama):
    base, model, inputs = patched_llama
    ref = logits(model, inputs)
    fastpeft.merge(model)
    torch.testing.assert_close(logits(model, inputs), ref, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        fastpeft.merge(model)
    torch.testing.assert_close(logits(model, inputs), ref, rtol=1e-5, atol=1e-5)
    fastpeft.unmerge(model)
    torch.testing.assert_close(logits(model, inputs), ref, rtol=1e-5, atol=1e-5)
    merged = fastpeft.unpatch(model, merge=True)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert not hasattr(merged, "fastpeft_config")
    torch.testing.assert_close(logits(merged, inputs), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unpatch_without_merge_restores_base(patched_llama):
    base, model, inputs = patched_llama
    fastpeft.merge(model)  # even merged adapters come back out
    plain = fastpeft.unpatch(model, merge=False)
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, inputs), logits(base, inputs), rtol=1e-5, atol=1e-6)
    assert sorted(plain.state_dict()) == sorted(base.state_dict())


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["gpt2", "falcon"])
def test_merge_and_unload_equals_peft(model_type):
    base = make_model(model_type)
    pm, fm = peft_and_fastpeft(base, dict(r=4, init_lora_weights=False, target_modules="all-linear"))
    a = pm.merge_and_unload()
    b = fastpeft.unpatch(fm, merge=True)
    assert [type(m) for m in b.modules()] == [type(m) for m in base.modules()]  # the base layers come back
    for (ka, va), (kb, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert ka == kb
        torch.testing.assert_close(vb, va, rtol=1e-6, atol=1e-7, msg=ka)


@torch.no_grad()
def test_safe_merge_catches_nan(patched_llama):
    _, model, inputs = patched_llama
    layer = model.model.layers[0].self_attn.q_proj
    layer.lora_B["default"].weight[0, 0] = float("nan")
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        fastpeft.merge(model, safe_merge=True)
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=0)


@torch.no_grad()
def test_disabled_adapters_give_base_outputs(patched_llama):
    base, model, inputs = patched_llama
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.enable_adapters(False)
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=0, atol=0)


@torch.no_grad()
def test_default_init_is_noop():
    base = make_model("qwen2")
    inputs = make_inputs("qwen2")
    model = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(target_modules="all-linear"))
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=0, atol=0)
    gauss = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(init_lora_weights="gaussian"))
    torch.testing.assert_close(logits(gauss, inputs), logits(base, inputs), rtol=0, atol=0)


def test_only_adapters_change_after_optimizer_step():
    base = make_model("opt")
    model = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        logits(model, make_inputs("opt")).float().pow(2).mean().backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:5]
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(target_modules="all-linear", bias="lora_only"),
    dict(target_modules="all-linear", bias="all"),
])
@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_print_trainable_parameters_equals_peft(model_type, kwargs, capsys):
    base = make_model(model_type)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **kwargs))
    fm = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4, **kwargs))
    pm.print_trainable_parameters()
    expected = capsys.readouterr().out
    fastpeft.print_trainable_parameters(fm)
    assert capsys.readouterr().out == expected
    assert expected.startswith("trainable params: ")
    assert fastpeft.trainable_parameters(fm) == pm.get_nb_trainable_parameters()
    # the same parameters are trainable
    peft_trainable = {n.removeprefix("base_model.model.").replace(".default.", ".")
                      for n, p in pm.named_parameters() if p.requires_grad}
    fast_trainable = {n.replace(".default.", ".") for n, p in fm.named_parameters() if p.requires_grad}
    assert fast_trainable == peft_trainable


def test_modules_to_save_trainable():
    model = fastpeft.patch(make_model("llama", head="seq_cls"), fastpeft.LoraConfig(r=4, task_type="SEQ_CLS"))
    assert model.score.weight.requires_grad
    peft_model = importlib.import_module("peft.peft_model")  # PEFT's own list: 0.22 adds pre_classifier
    peft_heads = list(getattr(peft_model, "CLASSIFIER_MODULE_NAMES", ("classifier", "score")))
    assert model.fastpeft_config["default"].modules_to_save == peft_heads
    assert not model.model.embed_tokens.weight.requires_grad


# --- dtypes / fan_in_fan_out / config storage ---------------------------------------------------
def test_adapter_dtype_follows_autocast():
    base = make_model("llama", dtype=torch.bfloat16)
    on = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4))
    off = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4), autocast_adapter_dtype=False)
    q_on, q_off = on.model.layers[0].self_attn.q_proj, off.model.layers[0].self_attn.q_proj
    assert q_on.lora_A["default"].weight.dtype == torch.float32
    assert q_off.lora_A["default"].weight.dtype == torch.bfloat16
    assert q_on.base_layer.weight.dtype == torch.bfloat16


def test_fan_in_fan_out_forced_like_peft():
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        gpt2 = fastpeft.patch(make_model("gpt2"), fastpeft.LoraConfig(r=4))
    assert gpt2.fastpeft_config["default"].fan_in_fan_out is True
    assert gpt2.transformer.h[0].attn.c_attn.fan_in_fan_out is True
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        llama = fastpeft.patch(make_model("llama"), fastpeft.LoraConfig(r=4, fan_in_fan_out=True))
    assert llama.fastpeft_config["default"].fan_in_fan_out is False


def test_patch_accepts_peft_config_and_dict():
    base = make_model("llama")
    a = fastpeft.patch(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj"]))
    b = fastpeft.patch(copy.deepcopy(base), {"r": 4, "lora_alpha": 16, "target_modules": ["k_proj"]})
    for m in (a, b):
        layer = m.model.layers[1].self_attn.k_proj
        assert isinstance(layer, LoraLinear) and layer.r["default"] == 4 and layer.scaling["default"] == 4.0
    assert lora_module_names(a) == lora_module_names(b)


def test_rank_and_alpha_pattern_per_module():
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
               rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6}, alpha_pattern={r"layers\.1\..*": 3})
    base = make_model("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    fm = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    peft_layers = dict(pm.base_model.model.named_modules())
    for name, layer in fm.named_modules():
        if isinstance(layer, LoraLinear):
            p = peft_layers[name]
            assert layer.r == p.r and layer.lora_alpha == p.lora_alpha, name
            assert layer.scaling["default"] == pytest.approx(p.scaling["default"]), name
            assert layer.scaling["default"] == pytest.approx(fm.fastpeft_config["default"].scaling_for(name))


# --- a second adapter ---------------------------------------------------------------------------
@torch.no_grad()
def test_second_adapter_added_inactive_then_selected():
    base = make_model("llama")
    inputs = make_inputs("llama")
    cfg1 = dict(r=4, init_lora_weights=False, target_modules=["q_proj"])
    cfg2 = dict(r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    pm, fm = peft_and_fastpeft(base, cfg1)
    pm.add_adapter("other", peft.LoraConfig(**cfg2))
    fastpeft.patch(fm, fastpeft.LoraConfig(**cfg2), adapter_name="other")
    copy_peft_adapter(pm, fm, "other")
    assert isinstance(fm.model.layers[0].self_attn.v_proj, LoraLinear)  # newly targeted layers are wrapped
    assert set(fm.model.layers[0].self_attn.q_proj.lora_A) == {"default", "other"}
    assert not fm.model.layers[0].self_attn.v_proj.lora_A["other"].weight.requires_grad  # inactive
    torch.testing.assert_close(logits(fm, inputs), logits(pm, inputs), rtol=1e-5, atol=1e-5)
    pm.set_adapter("other")
    from fastpeft.patch import set_adapter

    set_adapter(fm, "other")
    assert fm.model.layers[0].self_attn.v_proj.lora_A["other"].weight.requires_grad
    assert not fm.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad
    torch.testing.assert_close(logits(fm, inputs), logits(pm, inputs), rtol=1e-5, atol=1e-5)


# --- dropout (reference path) -------------------------------------------------------------------
def test_dropout_reproducible_and_train_only():
    base = make_model("llama")
    inputs = make_inputs("llama")
    cfg = dict(r=4, init_lora_weights=False, target_modules="all-linear")
    drop = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(lora_dropout=0.3, **cfg))
    nodrop = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    with torch.no_grad():
        for (_, a), (_, b) in zip(drop.named_parameters(), nodrop.named_parameters()):
            b.copy_(a)
        drop.train(), nodrop.train()
        torch.manual_seed(123)
        y1 = logits(drop, inputs)
        torch.manual_seed(123)
        y2 = logits(drop, inputs)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        y_nodrop = logits(nodrop, inputs)
        assert not torch.allclose(y1, y_nodrop, atol=1e-4)
        drop.eval(), nodrop.eval()
        torch.testing.assert_close(logits(drop, inputs), logits(nodrop, inputs), rtol=0, atol=0)


def test_second_adapter_all_linear_targets_equal_peft():
    base = make_model("gpt2")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules="all-linear"))
    fm = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4, target_modules=["c_attn"]))
    fastpeft.patch(fm, fastpeft.LoraConfig(r=2, target_modules="all-linear"), adapter_name="b")
    from fastpeft.model_state import lora_layers

    with_b = lambda m: {n.removeprefix("base_model.model.") for n, l in lora_layers(m) if "b" in l.lora_A}  # noqa: E731
    assert with_b(fm) == with_b(pm) and len(with_b(fm)) == 8
    assert fm.fastpeft_config["b"].target_modules == pm.peft_config["b"].target_modules


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning", "p_tuning", "adaption_prompt"])
def test_prompt_based_peft_models_left_to_peft(kind):
    """Prompt-based PEFT methods have no linear layer to fuse: patch(peft_model) leaves them to PEFT's code
    with one notice, the outputs unchanged."""
    base = make_model("llama")
    configs = {
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
        "adaption_prompt": lambda: peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1),
    }
    pm = peft.get_peft_model(copy.deepcopy(base), configs[kind]()).eval()
    inputs = make_inputs("llama")
    with torch.no_grad():
        before = logits(pm, inputs)
    with pytest.warns(UserWarning, match=r"left to PEFT's own code \(prompt-based methods"):
        assert fastpeft.patch(pm) is pm
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, inputs), before, rtol=0, atol=0)
