"""Adapter files across libraries: fastpeft.save_adapter -> peft.PeftModel.from_pretrained, and
peft save_pretrained -> fastpeft.load_adapter, give the same outputs; the files fastpeft writes have
PEFT's tensor keys, shapes and config values. Cases: plain, Conv1D, rsLoRA, rank/alpha patterns,
bias lora_only / all, modules_to_save (score, classifier, SEQ_CLS task heads), T5, Falcon (nn.Linear
subclasses), a non-default adapter name (subfolder); plus fastpeft round trips, is_trainable and loading into a patched model.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

import fastpeft
from fastpeft.peft_format import peft_state_dict
from lora_helpers import logits, peft_state
from tiny_models import make_inputs, make_model

peft = pytest.importorskip("peft")

@pytest.fixture(autouse=True)
def _reference_backend(set_options):
    set_options(backend="reference")


CASES = {
    "plain": ("llama", "main", dict(target_modules=["q_proj", "v_proj"])),
    "conv1d_all_linear": ("gpt2", "main", dict(target_modules="all-linear")),
    "rslora": ("qwen2", "main", dict(lora_alpha=16, use_rslora=True)),
    "patterns": ("llama", "main", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                       alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32})),
    "bias_lora_only": ("opt", "main", dict(target_modules="all-linear", bias="lora_only")),
    "bias_all": ("gpt_neox", "main", dict(bias="all")),
    "bias_all_conv1d": ("gpt2", "main", dict(bias="all", target_modules=["c_attn", "c_proj"])),
    "modules_to_save_score": ("llama", "seq_cls", dict(modules_to_save=["score"])),
    "seq_cls_task_classifier": ("bert", "seq_cls", dict(task_type="SEQ_CLS")),
    "bias_all_with_modules_to_save": ("bert", "seq_cls", dict(task_type="SEQ_CLS", bias="all")),
    "t5": ("t5", "main", dict(task_type="SEQ_2_SEQ_LM")),
    "falcon_defaults": ("falcon", "main", dict()),
    "falcon_all_linear": ("falcon", "main", dict(target_modules="all-linear")),
    "adapter_name_other": ("llama", "main", dict(target_modules=["q_proj", "k_proj"])),
}


def _adapter_name(case):
    return "other" if case == "adapter_name_other" else "default"


def _randomize_trainable(model, seed=7):
    """Non-trivial values for every trainable tensor (adapters, heads, biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _peft_model_dir(directory, adapter_name):
    return os.path.join(directory, adapter_name) if adapter_name != "default" else directory


def _keys_and_shapes(path):
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


# PEFT writes, with bias="all", the biases of its ModulesToSaveWrapper internals too
# (`classifier.original_module.bias`, `classifier.modules_to_save.bias`); fastpeft has no such copies.
def _without_wrapper_internals(keys):
    return {k: v for k, v in keys.items() if ".original_module." not in k and ".modules_to_save." not in k}


@pytest.fixture(scope="module")
def case_models():
    cache = {}

    def get(case):
        if case not in cache:
            model_type, head, cfg = CASES[case]
            cfg = dict(r=4, init_lora_weights=False, **cfg)
            cache[case] = (make_model(model_type, head=head), cfg, make_inputs(model_type))
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_fastpeft_save_loads_in_peft(case, case_models, tmp_path):
    base, cfg, inputs = case_models(case)
    name = _adapter_name(case)
    fm = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**cfg), adapter_name=name)
    _randomize_trainable(fm)
    out_dir = fastpeft.save_adapter(fm, tmp_path / "fast", adapter_name=name)
    assert os.path.samefile(out_dir, _peft_model_dir(tmp_path / "fast", name))
    fm.eval()

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out_dir, adapter_name=name)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, inputs), logits(fm, inputs), rtol=1e-5, atol=1e-5)

    # the same file PEFT writes for the same config: keys, shapes, metadata, config values
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name=name)
    pm.save_pretrained(tmp_path / "peft")
    peft_dir = _peft_model_dir(tmp_path / "peft", name)
    fast_keys, fast_meta = _keys_and_shapes(os.path.join(out_dir, "adapter_model.safetensors"))
    peft_keys, peft_meta = _keys_and_shapes(os.path.join(peft_dir, "adapter_model.safetensors"))
    assert fast_meta == peft_meta == {"format": "pt"}
    assert fast_keys == _without_wrapper_internals(peft_keys)
    fast_json = json.load(open(os.path.join(out_dir, "adapter_config.json")))
    peft_json = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    for key, value in fast_json.items():
        if key == "peft_version":
            continue
        expected = peft_json[key]
        if key in ("target_modules", "exclude_modules") and isinstance(value, list):
            value, expected = set(value), set(expected)
        assert value == expected, key
    assert fast_json["inference_mode"] is True and fast_json["peft_type"] == "LORA"
    text = open(os.path.join(out_dir, "adapter_config.json")).read()
    assert text == json.dumps(fast_json, indent=2, sort_keys=True)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_save_loads_in_fastpeft(case, case_models, tmp_path):
    base, cfg, inputs = case_models(case)
    name = _adapter_name(case)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name=name)
    _randomize_trainable(pm)
    pm.save_pretrained(tmp_path)
    pm.eval()

    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path, adapter_name=name)
    assert not fm.training
    assert not any(p.requires_grad for n, p in fm.named_parameters() if "lora_" in n)
    with torch.no_grad():
        torch.testing.assert_close(logits(fm, inputs), logits(pm, inputs), rtol=1e-5, atol=1e-5)
    # and what fastpeft holds is exactly what PEFT saved (minus PEFT's wrapper internals)
    saved = _without_wrapper_internals(peft_state(pm, name))
    mine = peft_state_dict(fm, name)
    assert set(mine) == set(saved)
    for k in saved:
        torch.testing.assert_close(mine[k].detach(), saved[k], rtol=0, atol=0, msg=k)


@torch.no_grad()
def test_fastpeft_round_trip_other_seed(tmp_path):
    base = make_model("gpt2")
    inputs = make_inputs("gpt2")
    cfg = fastpeft.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear", use_rslora=True)
    fm = fastpeft.patch(copy.deepcopy(base), cfg)
    fastpeft.save_adapter(fm, tmp_path)
    torch.manual_seed(999)  # a different init for the new adapter must not matter
    fresh = fastpeft.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert all(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)
    fm.eval(), fresh.eval()
    torch.testing.assert_close(logits(fresh, inputs), logits(fm, inputs), rtol=0, atol=0)
    assert fresh.fastpeft_config["default"].target_modules == fm.fastpeft_config["default"].target_modules


@torch.no_grad()
def test_load_into_already_patched_model(tmp_path):
    base = make_model("llama")
    inputs = make_inputs("llama")
    cfg = fastpeft.LoraConfig(r=4, init_lora_weights=False)
    src = fastpeft.patch(copy.deepcopy(base), cfg)
    fastpeft.save_adapter(src, tmp_path)
    dst = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4))  # same layout, default init
    fastpeft.load_adapter(dst, tmp_path)
    src.eval()
    torch.testing.assert_close(logits(dst, inputs), logits(src, inputs), rtol=0, atol=0)


@torch.no_grad()
def test_load_second_adapter_like_peft(tmp_path):
    base = make_model("llama")
    inputs = make_inputs("llama")
    a = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4, init_lora_weights=False, target_modules=["v_proj"]))
    fastpeft.save_adapter(a, tmp_path / "a")
    b = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]),
                       adapter_name="b")
    fastpeft.save_adapter(b, tmp_path, adapter_name="b")
    assert os.path.isfile(tmp_path / "b" / "adapter_config.json")

    model = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "a")
    fastpeft.load_adapter(model, tmp_path, adapter_name="b")  # found in the subfolder, added inactive
    a.eval()
    torch.testing.assert_close(logits(model, inputs), logits(a, inputs), rtol=0, atol=0)
    from fastpeft.patch import set_adapter

    set_adapter(model, "b")
    b.eval()
    torch.testing.assert_close(logits(model, inputs), logits(b, inputs), rtol=0, atol=0)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.set_adapter("b")
    torch.testing.assert_close(logits(pm, inputs), logits(b, inputs), rtol=1e-6, atol=1e-6)
