"""fastpeft.Options: typed, validated, seeded once from the environment; the process's options and a
patched model's own."""
import pytest

import fastpeft
from fastpeft import ops
from fastpeft.options import OPTIONS_ATTR, Options
from lora_helpers import train_step
from tiny_models import make_inputs, make_model


def test_defaults_and_validation():
    assert Options() == Options(backend="auto", fuse_mlp=True, group_projections=True)
    with pytest.raises(ValueError, match="backend must be one of auto, triton, reference, got 'cuda'"):
        Options(backend="cuda")
    with pytest.raises(TypeError, match="fuse_mlp must be a bool, got str '0'"):
        Options(fuse_mlp="0")


def test_environment_seeds_the_defaults():
    env = {"FASTPEFT_BACKEND": " Reference ", "FASTPEFT_FUSE_MLP": "0", "FASTPEFT_GROUP_PROJECTIONS": "1"}
    assert Options.from_env(env) == Options(backend="reference", fuse_mlp=False, group_projections=True)
    assert Options.from_env({}) == Options()
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND must be one of auto, triton, reference, got 'gpu'"):
        Options.from_env({"FASTPEFT_BACKEND": "gpu"})


def test_set_options_returns_the_previous(set_options):
    before = fastpeft.get_options()
    previous = fastpeft.set_options(backend="reference")
    assert previous == before and fastpeft.get_options().backend == "reference"
    fastpeft.set_options(previous)
    assert fastpeft.get_options() == before
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['fuse_qkv'\]"):
        fastpeft.set_options(fuse_qkv=False)
    with pytest.raises(TypeError, match="set_options takes a fastpeft.Options, got dict"):
        fastpeft.set_options({"backend": "auto"})
    assert fastpeft.get_options() == before


def _count(monkeypatch, cls):
    calls = []
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", staticmethod(lambda *a: (calls.append(1), forward(*a))[1]))
    return calls


def test_a_models_options_beat_the_process_options(kernels_on, monkeypatch):
    """Under the triton backend, a model patched with Options(backend="reference") runs plain PyTorch,
    and one with fuse_mlp=False / group_projections=False runs its LoRA layers one by one; unpatch
    takes the options out."""
    config = fastpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    inputs = {k: v.to(kernels_on) for k, v in make_inputs("llama").items()}
    linear = _count(monkeypatch, ops.LoraLinearFunction)
    mlps, groups = _count(monkeypatch, ops.LoraMLPFunction), _count(monkeypatch, ops.LoraGroupFunction)

    model = fastpeft.patch(make_model("llama"), config, options=Options(backend="reference")).to(kernels_on)
    train_step(model, inputs)
    assert (len(linear), len(mlps), len(groups)) == (0, 0, 0)

    unfused = Options(backend="triton", fuse_mlp=False, group_projections=False)
    model = fastpeft.patch(make_model("llama"), config, options=unfused)
    train_step(model.to(kernels_on), inputs)
    assert len(linear) == 2 * 7 and (len(mlps), len(groups)) == (0, 0)  # 2 layers x 7 projections, one by one
    assert all(m.__dict__[OPTIONS_ATTR].fuse_mlp is False for m in model.modules() if isinstance(m, fastpeft.LoraLinear))
    fastpeft.unpatch(model)
    assert not any(OPTIONS_ATTR in m.__dict__ for m in model.modules())

    model = fastpeft.patch(make_model("llama"), config).to(kernels_on)  # the process's: fused
    train_step(model, inputs)
    assert (len(mlps), len(groups)) == (2, 2)


def test_patch_rejects_other_options():
    with pytest.raises(TypeError, match="options must be a fastpeft.Options, got dict"):
        fastpeft.patch(make_model("llama"), fastpeft.LoraConfig(r=4), options={"backend": "reference"})


def test_layers_added_later_get_the_models_options(tmp_path):
    """A second adapter, patched or loaded, that wraps more layers gives them the model's options."""
    fastpeft.save_adapter(fastpeft.patch(make_model("llama"), fastpeft.LoraConfig(r=4, target_modules="all-linear")),
                          tmp_path / "all")
    mine = Options(backend="reference", fuse_mlp=False)
    model = fastpeft.patch(make_model("llama"), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]), options=mine)
    fastpeft.patch(model, fastpeft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]), adapter_name="more")
    fastpeft.load_adapter(model, tmp_path / "all", adapter_name="all")
    layers = [m for m in model.modules() if isinstance(m, fastpeft.LoraLinear)]
    assert len(layers) == 2 * 7 and all(m.__dict__[OPTIONS_ATTR] is mine for m in layers)
    assert model.__dict__[OPTIONS_ATTR] is mine
