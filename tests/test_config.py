"""fastpeft.LoraConfig against peft.LoraConfig: defaults, validation, per-module r/alpha/scaling, the
adapter_config.json round trip in both directions, unsupported options, and that importing fastpeft
never imports peft."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest

import fastpeft
from fastpeft import LoraConfig
from fastpeft.config import pattern_key

peft = pytest.importorskip("peft")

FIELDS = [
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "use_rslora", "use_dora", "lora_bias", "task_type", "inference_mode",
    "base_model_name_or_path", "revision",
]


def test_import_does_not_import_peft():
    code = "import sys, fastpeft; assert 'peft' not in sys.modules, 'peft was imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_defaults_equal_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.peft_type == "LORA"


def test_from_peft_reads_every_field():
    theirs = peft.LoraConfig(
        r=6, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"],
        bias="lora_only", modules_to_save=["score"], init_lora_weights="gaussian", layers_to_transform=[0, 1],
        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4}, use_rslora=True, task_type="CAUSAL_LM",
    )
    ours = LoraConfig.from_peft(theirs)
    for name in FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert isinstance(ours.task_type, str) and ours.task_type == "CAUSAL_LM"


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], use_rslora=True),
    dict(target_modules=r".*\.q_proj", exclude_modules=r".*0.*", init_lora_weights=False),
    dict(bias="all", modules_to_save=["score"], task_type="SEQ_CLS", rank_pattern={"a": 2}, alpha_pattern={"b": 3}),
    dict(layers_to_transform=[1], layers_pattern="layers", target_modules=["q"], init_lora_weights="gaussian"),
])
def test_json_round_trip_both_ways(kwargs, tmp_path):
    ours = LoraConfig(**kwargs)
    ours.save(tmp_path / "ours")
    text = (tmp_path / "ours" / "adapter_config.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True)
    assert data["peft_type"] == "LORA" and data["inference_mode"] is True and isinstance(data["peft_version"], str)
    if kwargs.get("target_modules") and not isinstance(kwargs["target_modules"], str):
        assert isinstance(data["target_modules"], list)

    back = LoraConfig.from_pretrained(tmp_path / "ours")
    assert back.inference_mode is True
    back.inference_mode = ours.inference_mode
    assert back.to_dict() == {**ours.to_dict(), "peft_version": back.peft_version}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT reads fastpeft's file without complaint
        theirs = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
    for name in FIELDS:
        if name == "inference_mode":
            continue
        assert getattr(theirs, name) == getattr(ours, name), name

    original = peft.LoraConfig(**kwargs)
    original.save_pretrained(str(tmp_path / "theirs"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's neutral extra keys are dropped silently
        from_peft_file = LoraConfig.from_pretrained(tmp_path / "theirs")
    for name in FIELDS:  # (peft's config.save_pretrained keeps inference_mode; its model.save_pretrained sets it)
        assert getattr(from_peft_file, name) == getattr(original, name), name


def test_unknown_keys_dropped_with_warning(tmp_path):
    data = {**LoraConfig(r=4).to_dict(), "brand_new_option": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="brand_new_option"):
        cfg = LoraConfig.from_pretrained(tmp_path)
    assert cfg.r == 4 and not hasattr(cfg, "brand_new_option")


def test_non_lora_peft_type_raises(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k"]}))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only LoRA"):
        LoraConfig.from_peft(peft.IA3Config())


@pytest.mark.parametrize("key,value", [
    ("layer_replication", [[0, 2], [1, 2]]),
    ("use_qalora", True),
    ("alora_invocation_tokens", [1, 2]),
    ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("trainable_token_indices", [1, 2]),
    ("ensure_weight_tying", True),
])
def test_unsupported_peft_options_raise(key, value):
    with pytest.raises(NotImplementedError, match=key):
        LoraConfig.from_dict({"peft_type": "LORA", key: value})


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq", "eva", "corda"])
def test_unsupported_init_raises(init):
    with pytest.raises(NotImplementedError, match="init_lora_weights"):
        LoraConfig(init_lora_weights=init)


def test_neutral_peft_values_accepted():
    cfg = LoraConfig.from_dict({"peft_type": "LORA", "layer_replication": None, "use_qalora": False,
                                "megatron_core": "megatron.core", "loftq_config": {}, "qalora_group_size": 16})
    assert cfg.r == 8


@pytest.mark.parametrize("names", [
    ["q_proj"], ["layers.0.self_attn.q_proj", "q_proj"], [r"layers\.\d\.self_attn\.v_proj"], ["proj"], [],
])
@pytest.mark.parametrize("module", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "q_proj"])
def test_pattern_key_equals_peft(names, module):
    from peft.utils.other import get_pattern_key

    peft_key = get_pattern_key(names, module)
    assert pattern_key(names, module) == (peft_key if peft_key in names else None)


def test_scaling_per_module():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\..*": 2})
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == 4.0
    assert cfg.scaling_for("model.layers.1.self_attn.v_proj") == 0.5
    rs = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling_for("x.q_proj") == pytest.approx(8 / math.sqrt(16))


def test_coerce_copies_and_accepts_dicts():
    cfg = LoraConfig(target_modules=["q_proj"])
    copy_ = LoraConfig.coerce(cfg)
    assert copy_ == cfg and copy_ is not cfg and copy_.target_modules is not cfg.target_modules
    assert LoraConfig.coerce({"r": 4}).r == 4
    assert LoraConfig.coerce(None) == LoraConfig()
    with pytest.raises(TypeError, match="lora_config must be"):
        LoraConfig.coerce(42)


def test_exports():
    for name in fastpeft.__all__:
        assert hasattr(fastpeft, name), name


def test_every_peft_field_is_classified():
    """A PEFT LoRA field is either implemented, rejected when set, or known not to change the numbers."""
    import dataclasses

    from fastpeft.config import _IGNORED_OPTIONS, _UNSUPPORTED_OPTIONS

    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert theirs - ours - set(_UNSUPPORTED_OPTIONS) - set(_IGNORED_OPTIONS) == set()


def test_patch_does_not_mutate_caller_config():
    from tiny_models import make_model

    ours = LoraConfig(target_modules="all-linear", task_type="SEQ_CLS")
    theirs = peft.LoraConfig(target_modules="all-linear", task_type="SEQ_CLS")
    fastpeft.patch(make_model("gpt2", head="seq_cls"), ours)
    fastpeft.patch(make_model("gpt2", head="seq_cls"), theirs)
    assert ours.target_modules == theirs.target_modules == "all-linear"
    assert ours.modules_to_save is None and theirs.modules_to_save is None
    assert ours.fan_in_fan_out is False and theirs.fan_in_fan_out is False
