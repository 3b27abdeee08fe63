"""Every user-facing error of the foundation API, with its message: bad config values, unsupported
options and module types, nothing matched, double patching, missing defaults, and every way an
adapter folder can be wrong when loading (which must leave the model untouched)."""
from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft import LoraConfig
from fastpeft.layer import LoraLinear
from tiny_models import make_model


# --- config values ------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0, -2])
def test_r_must_be_positive(r):
    with pytest.raises(ValueError, match=rf"`r` should be a positive integer value but the value passed is {r}"):
        LoraConfig(r=r)


def test_rank_pattern_must_be_positive():
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\] should be a positive integer"):
        LoraConfig(rank_pattern={"q_proj": 0})


def test_bad_bias():
    with pytest.raises(ValueError, match=r"bias must be one of 'none', 'all', 'lora_only', got 'some'"):
        LoraConfig(bias="some")


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match=rf"lora_dropout must be in \[0, 1\), got {p}"):
        LoraConfig(lora_dropout=p)


# Values as YAML or argparse hand them over, and other wrong types: PEFT accepts them all, then fails later.
BAD_TYPES = {
    "r-str": (dict(r="8"), r"r must be an int, got str '8'"),
    "r-float": (dict(r=8.0), r"r must be an int, got float 8.0"),
    "r-bool": (dict(r=True), r"r must be an int, got bool True"),
    "alpha-str": (dict(lora_alpha="16"), r"lora_alpha must be a number \(int or float\), got str '16'"),
    "dropout-str": (dict(lora_dropout="0.1"), r"lora_dropout must be a number \(int or float\), got str '0.1'"),
    "rslora-str": (dict(use_rslora="yes"), r"use_rslora must be True or False, got str 'yes'"),
    "inference-mode-int": (dict(inference_mode=1), r"inference_mode must be True or False, got int 1"),
    "rank-pattern-str": (dict(rank_pattern={"q_proj": "4"}), r"rank_pattern\['q_proj'\] must be an int, got str '4'"),
    "alpha-pattern-str": (dict(alpha_pattern={"q_proj": "4"}),
                          r"alpha_pattern\['q_proj'\] must be a number \(int or float\), got str '4'"),
    "rank-pattern-list": (dict(rank_pattern=["q_proj"]), r"rank_pattern must be a dict .*, got list \['q_proj'\]"),
    "targets-int-entry": (dict(target_modules=["q_proj", 3]),
                          r"target_modules must be None, a str or a list of str, got list \['q_proj', 3\]"),
    "modules-to-save-str": (dict(modules_to_save="score"), r"modules_to_save must be None or a list of str, got str 'score'"),
    "layers-str": (dict(target_modules=["q_proj"], layers_to_transform="0"),
                   r"layers_to_transform must be None, an int or a list of int, got str '0'"),
    "base-model-int": (dict(base_model_name_or_path=3), r"base_model_name_or_path must be None or a str, got int 3"),
}


@pytest.mark.parametrize("case", list(BAD_TYPES))
def test_config_types_checked(case):
    kwargs, message = BAD_TYPES[case]
    with pytest.raises(TypeError, match=message):
        LoraConfig(**kwargs)
    with pytest.raises(TypeError, match=message):  # a dict (adapter_config.json) goes through the same checks
        LoraConfig.from_dict({"peft_type": "LORA", **kwargs})


def test_config_non_finite_alpha():
    with pytest.raises(ValueError, match="lora_alpha must be a finite number, got nan"):
        LoraConfig(lora_alpha=float("nan"))


def test_config_numpy_numbers_become_python_numbers():
    np = pytest.importorskip("numpy")
    cfg = LoraConfig(r=np.int64(4), lora_alpha=np.float32(8.5), lora_dropout=np.float64(0.25),
                     target_modules=("q_proj",), layers_to_transform=(np.int64(1),), rank_pattern={"q": np.int32(2)})
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.layers_to_transform, cfg.rank_pattern) == (4, 8.5, 0.25, [1], {"q": 2})
    assert type(cfg.r) is int and type(cfg.lora_alpha) is float and type(cfg.rank_pattern["q"]) is int
    assert json.loads(json.dumps(cfg.to_dict()))["r"] == 4


def test_bad_task_type():
    with pytest.raises(ValueError, match="task_type must be one of"):
        LoraConfig(task_type="CLASSIFY")


def test_lora_bias_not_implemented():
    with pytest.raises(NotImplementedError, match="lora_bias"):
        LoraConfig(lora_bias=True)


def test_peft_config_with_lora_bias_not_implemented_at_patch():
    peft = pytest.importorskip("peft")
    with pytest.raises(NotImplementedError, match="lora_bias"):
        fastpeft.patch(make_model("llama"), peft.LoraConfig(lora_bias=True))


def test_layers_to_transform_needs_list_targets():
    with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
        LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="`layers_to_transform` must also be specified"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


def test_bad_lora_config_type():
    with pytest.raises(TypeError, match="lora_config must be a fastpeft.LoraConfig"):
        fastpeft.patch(make_model("llama"), "r=8")


# --- patching -----------------------------------------------------------------------------------
@pytest.mark.parametrize("call", ["patch", "unpatch", "merge", "unmerge", "save_adapter", "load_adapter"])
@pytest.mark.parametrize("not_a_model,type_name", [({}, "dict"), ("model", "str"), (torch.zeros(2), "Tensor")],
                         ids=["dict", "str", "tensor"])
def test_not_a_module(call, not_a_model, type_name, tmp_path):
    args = (tmp_path,) if call in ("save_adapter", "load_adapter") else ()
    with pytest.raises(TypeError, match=rf"fastpeft\.{call} expects a torch\.nn\.Module \(a transformers model or a "
                                        rf"peft\.PeftModel\), got {type_name}$"):
        getattr(fastpeft, call)(not_a_model, *args)


def test_patch_plain_model_needs_a_config():
    model = make_model("llama")
    with pytest.raises(TypeError, match=r"fastpeft\.patch needs a lora_config for LlamaForCausalLM, which has no PEFT "
                                        r"adapters, e\.g\. fastpeft\.LoraConfig\(r=16, .*only a peft\.PeftModel"):
        fastpeft.patch(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert isinstance(fastpeft.patch(model, LoraConfig()).model.layers[0].self_attn.q_proj, LoraLinear)


def test_phi3_without_targets():
    with pytest.raises(ValueError, match=r"no default target modules for model_type 'phi3': pass target_modules"):
        fastpeft.patch(make_model("phi3"), LoraConfig())


def test_unknown_model_without_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no default target modules for Sequential \(no config.model_type\)"):
        fastpeft.patch(model, LoraConfig())
    model.config = type("Cfg", (), {"model_type": "my_new_arch"})()
    with pytest.raises(ValueError, match="model_type 'my_new_arch'"):
        fastpeft.patch(model, LoraConfig())


def test_nothing_matched_lists_linear_layers():
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"no module matched \(target_modules=\['qq_proj'\]\).*"
                                         r"model\.layers\.\*\.self_attn\.q_proj.*lm_head"):
        fastpeft.patch(model, LoraConfig(target_modules=["qq_proj"]))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_target_name_matching_nothing_warns():
    model = make_model("llama")
    with pytest.warns(UserWarning, match=r"target_modules entries \['vproj'\] matched no module of LlamaForCausalLM "
                                         r"\(LoRA goes on the other entries' matches\); its linear layers are: "
                                         r"model\.layers\.\*\.self_attn\.q_proj"):
        fastpeft.patch(model, LoraConfig(target_modules=["q_proj", "vproj"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)


@pytest.mark.parametrize("targets", [
    ["q_proj", "self_attn.v_proj", "model.layers.1.mlp.up_proj"],  # exact names and dotted suffixes
    r".*\.(q_proj|vproj)",  # a regex may match fewer names than it spells
    "all-linear",
    None,  # the model type's defaults
], ids=["names", "regex", "all-linear", "default"])
def test_target_names_that_match_do_not_warn(targets):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.patch(make_model("llama"), LoraConfig(target_modules=targets))


def test_everything_excluded():
    with pytest.raises(ValueError, match="every matching module was excluded"):
        fastpeft.patch(make_model("llama"), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_layers_to_transform_out_of_range():
    with pytest.raises(ValueError, match=r"no module matched .*layers_to_transform=\[7\]"):
        fastpeft.patch(make_model("llama"), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_patch_twice_same_name():
    model = fastpeft.patch(make_model("llama"), LoraConfig(r=4))
    with pytest.raises(ValueError, match="adapter 'default' is already patched into this model"):
        fastpeft.patch(model, LoraConfig(r=4))


def test_two_adapters_with_bias():
    model = fastpeft.patch(make_model("opt"), LoraConfig(r=4, bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        fastpeft.patch(model, LoraConfig(r=4, bias="lora_only"), adapter_name="second")


@pytest.mark.parametrize("name", ["", "a.b", None])
def test_bad_adapter_name(name):
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
        fastpeft.patch(make_model("llama"), LoraConfig(), adapter_name=name)


class _WithOddLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(2, 2, 3)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)


@pytest.mark.parametrize("target,exc,what", [
    ("embed", NotImplementedError, r"'embed'.*torch\.nn\.modules\.sparse\.Embedding"),
    ("conv", NotImplementedError, r"'conv'.*torch\.nn\.modules\.conv\.Conv2d"),
    ("norm", TypeError, r"'norm'.*torch\.nn\.modules\.normalization\.LayerNorm"),
])
def test_unsupported_module_type(target, exc, what):
    model = _WithOddLayers()
    with pytest.raises(exc, match=what):
        fastpeft.patch(model, LoraConfig(target_modules=[target, "proj"]))
    assert isinstance(model.proj, nn.Linear) and not isinstance(model.proj, LoraLinear)  # nothing changed


def test_8bit_linear_not_implemented_and_unquantized_4bit_refused():
    """bitsandbytes' classes stood in for by name (what fastpeft looks at): an 8-bit layer is not
    supported; a 4-bit one without a quant_state is not quantized yet. Nothing changes either way."""
    class Int8Params(nn.Parameter):
        pass

    class Linear8bitLt(nn.Linear):
        pass

    class Params4bit(nn.Parameter):
        pass

    class Linear4bit(nn.Linear):
        pass

    for layer_cls, param_cls, error, match in (
            (Linear8bitLt, Int8Params, NotImplementedError, r"'1'.*8-bit bitsandbytes .*Linear8bitLt.*load_in_8bit"),
            (Linear4bit, Params4bit, ValueError, r"'1'.*no quant_state")):
        model = nn.Sequential(nn.Linear(4, 4))
        q = layer_cls(4, 4)
        q.weight = param_cls(torch.zeros(4, 4))
        model.append(q)
        with pytest.raises(error, match=match):
            fastpeft.patch(model, LoraConfig(target_modules=["0", "1"]))
        assert type(model[0]) is nn.Linear and type(model[1]) is layer_cls


@pytest.mark.parametrize("parent", ["Linear", "FalconLinear"])
def test_linear_subclass_with_own_forward(parent):
    """Only the listed classes' own forward counts as nn.Linear's, not a subclass's override of it."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    class ScaledLinear({"Linear": nn.Linear, "FalconLinear": FalconLinear}[parent]):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 4), ScaledLinear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=r"ScaledLinear subclasses nn.Linear with its own forward"):
        fastpeft.patch(model, LoraConfig(target_modules=["0", "1"]))
    assert [type(m) for m in model] == [nn.Linear, ScaledLinear] and not hasattr(model, "fastpeft_config")
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unpatch_unpatched():
    with pytest.raises(ValueError, match="not patched by fastpeft"):
        fastpeft.unpatch(make_model("llama"))


def test_merge_unpatched():
    with pytest.raises(ValueError, match="no LoRA layers to merge"):
        fastpeft.merge(make_model("llama"))


def test_modules_to_save_shared_between_adapters():
    model = fastpeft.patch(make_model("llama", head="seq_cls"), LoraConfig(r=4, modules_to_save=["score"]))
    with pytest.raises(NotImplementedError, match=r"\['score'\] in modules_to_save, already trained by adapter 'default'"):
        fastpeft.patch(model, LoraConfig(r=4, modules_to_save=["score"]), adapter_name="second")


# --- a failed patch leaves the model as it was ---------------------------------------------------
def model_state(model) -> dict:
    """What patch may change: tensors by value, the parameter objects and their requires_grad, and
    per module its type, train flag, attribute names, the keys of its dict attributes (children,
    parameters, per-adapter dicts, hook ids) and its hooks."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "parameters": {n: (id(p), p.requires_grad) for n, p in model.named_parameters()},
        "modules": {
            n: (type(m), m.training, sorted(m.__dict__), {k: list(v) for k, v in m.__dict__.items() if isinstance(v, dict)},
                list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()))
            for n, m in model.named_modules()
        },
    }


def assert_same_state(after: dict, before: dict) -> None:
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not torch.equal(after["tensors"][k], v)]
    assert not changed, f"tensors changed: {changed[:5]}"
    assert after["parameters"] == before["parameters"]
    assert after["modules"].keys() == before["modules"].keys()
    for name, entry in before["modules"].items():
        assert after["modules"][name] == entry, f"module {name!r} changed"


def _fail_on_call(monkeypatch, owner, attr: str, n: int = 1) -> None:
    """Make ``owner.attr`` raise on its n-th call, after doing its work (a failure midway through patch)."""
    real, calls = getattr(owner, attr), []

    def failing(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(None)
        if len(calls) == n:
            raise RuntimeError(f"injected failure in {attr}")
        return out

    monkeypatch.setattr(owner, attr, failing)


def _all_linear(**kwargs):
    return LoraConfig(r=4, target_modules="all-linear", **kwargs)


def _peft():
    return pytest.importorskip("peft")


_patch_module = importlib.import_module("fastpeft.patch")  # (fastpeft.patch is the function)

# name -> (set-up, the failing call given the model and a saved all-linear adapter "new", the error)
FAILING_PATCHES = {
    "dropout-str-dict": (None, lambda m, d: fastpeft.patch(m, {"lora_dropout": "0.1"}, "new"), TypeError),
    "alpha-str-peft-config": (None, lambda m, d: fastpeft.patch(m, _peft().LoraConfig(lora_alpha="16"), "new"),
                              TypeError),
    "dropout-1-dict": (None, lambda m, d: fastpeft.patch(m, {"lora_dropout": 1.0}, "new"), ValueError),
    "nothing-matched": (None, lambda m, d: fastpeft.patch(m, LoraConfig(target_modules=["qq_proj"]), "new"), ValueError),
    "unsupported-module": (None, lambda m, d: fastpeft.patch(m, LoraConfig(target_modules=["q_proj", "embed_tokens"]),
                                                             "new"), NotImplementedError),
    "3rd-update-layer": (lambda mp: _fail_on_call(mp, LoraLinear, "update_layer", 3),
                         lambda m, d: fastpeft.patch(m, _all_linear(), "new"), RuntimeError),
    "last-update-layer": (lambda mp: _fail_on_call(mp, LoraLinear, "update_layer", 14),
                          lambda m, d: fastpeft.patch(m, _all_linear(), "new"), RuntimeError),
    "mlp-install": (lambda mp: _fail_on_call(mp, fastpeft.mlp, "install"),
                    lambda m, d: fastpeft.patch(m, _all_linear(), "new"), RuntimeError),
    "group-install": (lambda mp: _fail_on_call(mp, fastpeft.group, "install"),
                      lambda m, d: fastpeft.patch(m, _all_linear(), "new"), RuntimeError),
    "mark-trainable": (lambda mp: _fail_on_call(mp, _patch_module, "mark_trainable"),  # after every install
                       lambda m, d: fastpeft.patch(m, _all_linear(bias="all"), "new"), RuntimeError),
    "load-adapter-group-install": (lambda mp: _fail_on_call(mp, fastpeft.group, "install"),
                                   lambda m, d: fastpeft.load_adapter(m, d, "new"), RuntimeError),
}


@pytest.fixture(scope="module")
def saved_all_linear(tmp_path_factory):
    """An all-linear r=4 adapter saved under the name "new" (for the load_adapter case)."""
    d = tmp_path_factory.mktemp("all_linear")
    fastpeft.save_adapter(fastpeft.patch(make_model("llama"), _all_linear(), "new"), d, adapter_name="new")
    return d


@pytest.mark.parametrize("already", ["plain", "patched"], ids=["plain-model", "second-adapter"])
@pytest.mark.parametrize("case", list(FAILING_PATCHES))
def test_failed_patch_leaves_model_as_it_was(case, already, monkeypatch, saved_all_linear):
    setup, call, exc = FAILING_PATCHES[case]
    if case == "mark-trainable" and already == "patched":
        pytest.skip("adding an adapter to a patched model does not call mark_trainable")
    model = make_model("llama")
    if already == "patched":  # q and v wrapped by adapter "default": the failing call adds to them too
        fastpeft.patch(model, LoraConfig(r=2, init_lora_weights=False))
    model.train()
    before = model_state(model)
    if setup is not None:
        setup(monkeypatch)
    with pytest.raises(exc):
        call(model, saved_all_linear)
    assert_same_state(model_state(model), before)
    monkeypatch.undo()
    fastpeft.patch(model, _all_linear(), "new")  # and the model takes the adapter once nothing fails


@pytest.mark.parametrize("already", ["plain", "patched"], ids=["plain-model", "second-adapter"])
@pytest.mark.parametrize("edit", ["missing-key", "shape-mismatch"])
def test_bad_file_for_new_adapter_leaves_model_as_it_was(edit, already, saved_all_linear, tmp_path):
    """load_adapter patches a new adapter in to check the file against it: a bad file undoes that patch."""
    d = tmp_path / "bad"
    shutil.copytree(saved_all_linear, d)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    _edit_weights(d / "new", lambda t: t.pop(key) if edit == "missing-key" else t.__setitem__(key, torch.zeros(3, 4)))
    model = make_model("llama")
    if already == "patched":
        fastpeft.patch(model, LoraConfig(r=2, init_lora_weights=False))
    model.train()
    before = model_state(model)
    with pytest.raises(KeyError if edit == "missing-key" else ValueError, match=r"layers\.1\.mlp\.down_proj"):
        fastpeft.load_adapter(model, d, "new")
    assert_same_state(model_state(model), before)
    fastpeft.load_adapter(model, saved_all_linear, "new")  # and the good file loads


def test_failed_patch_of_peft_model_leaves_it_as_it_was(monkeypatch):
    pm = _peft().get_peft_model(make_model("llama"), _peft().LoraConfig(r=4, target_modules="all-linear"))
    before = model_state(pm)
    _fail_on_call(monkeypatch, fastpeft.group, "install")
    with pytest.raises(RuntimeError, match="injected failure"):
        fastpeft.patch(pm)
    assert_same_state(model_state(pm), before)


# --- loading ------------------------------------------------------------------------------------
@pytest.fixture
def saved_adapter(tmp_path):
    base = make_model("llama")
    model = fastpeft.patch(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights=False))
    fastpeft.save_adapter(model, tmp_path)
    return base, tmp_path


def _fresh_patched(base):
    model = fastpeft.patch(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights=False))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def _edit_weights(directory, fn):
    path = os.path.join(directory, "adapter_model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_load_missing_key(saved_adapter):
    base, d = saved_adapter
    _edit_weights(d, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    model, before = _fresh_patched(base)
    with pytest.raises(KeyError, match=r"missing 1 tensor.*layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        fastpeft.load_adapter(model, d)
    _assert_untouched(model, before)
    plain = copy.deepcopy(base)
    with pytest.raises(KeyError, match="missing 1 tensor"):
        fastpeft.load_adapter(plain, d)
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())  # not left half patched


def test_load_unexpected_key(saved_adapter):
    base, d = saved_adapter
    _edit_weights(d, lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                                             torch.zeros(4, 32)))
    model, before = _fresh_patched(base)
    with pytest.raises(KeyError, match=r"1 tensor\(s\) the model does not have.*mlp\.up_proj\.lora_A\.weight"):
        fastpeft.load_adapter(model, d)
    _assert_untouched(model, before)


def test_load_shape_mismatch(saved_adapter):
    base, d = saved_adapter
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_weights(d, lambda t: t.__setitem__(key, torch.zeros(3, 32)))
    model, before = _fresh_patched(base)
    with pytest.raises(ValueError, match=rf"shape mismatch for {key.replace('.', '[.]')} .*file has \(3, 32\), "
                                         rf"the model expects \(4, 32\)"):
        fastpeft.load_adapter(model, d)
    _assert_untouched(model, before)


def test_load_rank_differs_from_patched_model(saved_adapter):
    base, d = saved_adapter
    model = fastpeft.patch(copy.deepcopy(base), LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"shape mismatch .*file has \(4, 32\), the model expects \(2, 32\)"):
        fastpeft.load_adapter(model, d)


def test_load_missing_config(saved_adapter):
    base, d = saved_adapter
    os.remove(os.path.join(d, "adapter_config.json"))
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json in "):
        fastpeft.load_adapter(copy.deepcopy(base), d)


def test_load_unreadable_config(saved_adapter):
    base, d = saved_adapter
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"cannot read the adapter config .*adapter_config\.json"):
        fastpeft.load_adapter(copy.deepcopy(base), d)


def test_load_config_without_peft_type(saved_adapter):
    base, d = saved_adapter
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump({"r": 4}, f)
    with pytest.raises(ValueError, match="has no 'peft_type' key"):
        fastpeft.load_adapter(copy.deepcopy(base), d)


def test_load_bin_only(saved_adapter):
    base, d = saved_adapter
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    open(os.path.join(d, "adapter_model.bin"), "wb").close()
    with pytest.raises(ValueError, match=r"adapter_model\.bin is a pickle file: fastpeft only loads safetensors"):
        fastpeft.load_adapter(copy.deepcopy(base), d)


def test_load_no_weights(saved_adapter):
    base, d = saved_adapter
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"adapter weights not found: .*adapter_model\.safetensors"):
        fastpeft.load_adapter(copy.deepcopy(base), d)


def test_load_corrupt_weights(saved_adapter):
    base, d = saved_adapter
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read the adapter weights .*adapter_model\.safetensors"):
        fastpeft.load_adapter(copy.deepcopy(base), d)


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter directory not found: .*nope \(fastpeft reads local "
                                                r"directories only\)"):
        fastpeft.load_adapter(make_model("llama"), tmp_path / "nope")


def test_load_hub_id_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"adapter directory not found: org/name; fastpeft reads local "
                                                r"directories only: if 'org/name' is a Hugging Face Hub repo id, "
                                                r"download it first with huggingface_hub\.snapshot_download\('org/name'\) "
                                                r"and pass the path it returns"):
        fastpeft.load_adapter(make_model("llama"), "org/name")


def test_load_file_instead_of_directory(saved_adapter):
    base, d = saved_adapter
    with pytest.raises(NotADirectoryError, match=r"expected an adapter directory, got the file .*adapter_config\.json"):
        fastpeft.load_adapter(copy.deepcopy(base), d / "adapter_config.json")


def test_save_unknown_adapter(tmp_path):
    model = fastpeft.patch(make_model("llama"), LoraConfig(r=4))
    with pytest.raises(ValueError, match=r"no fastpeft adapter 'other'; it has \['default'\]"):
        fastpeft.save_adapter(model, tmp_path, adapter_name="other")
