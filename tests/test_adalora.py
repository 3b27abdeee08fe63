"""AdaLoRA: patch(peft_model) on PEFT AdaLoRA models against an unpatched copy of the same PeftModel
(CPU: the reference path, and the fused LoRA kernels under TRITON_INTERPRET=1).

Checks: logits, the loss with its orthogonality regularizer and the gradients of every lora_A, lora_B
and lora_E (and of the input embedding: dX) on fp32 tiny llama (fused MLP and q/k/v ops under the
kernels), gpt2 (Conv1D, fan_in_fan_out) and opt; a bf16 base (fp32 adapters) by the tolerance rule;
lora_dropout > 0 in eval mode; training steps with update_and_allocate give the same losses, lora_E
masks, rank patterns and parameters; save_pretrained by the patched model loads into plain PEFT and
back (rank patterns resized on load, a rank-0 layer included); several active adapters; disabled /
merged adapters; unpatch; 4-bit bases keep PEFT's forward with a warning; unsupported PEFT methods
name themselves.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastpeft
from lora_helpers import check_one_disabled_merged, logits
from tiny_models import make_inputs, make_model
from tolerance import assert_close, rel_err

peft = pytest.importorskip("peft")

TARGETS = {  # every linear projection of the decoder blocks
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


@pytest.fixture(params=["reference", "kernels"])
def backend(request, set_options):
    """The reference path, or the kernels (under the interpreter on CPU)."""
    if request.param == "kernels":
        return request.getfixturevalue("kernels_on")
    set_options(backend="reference")
    return "cpu"


def adalora_config(model_type, **kwargs):
    """task_type CAUSAL_LM: PEFT adds the orthogonality regularizer only through PeftModelForCausalLM (and
    the other task classes); a PeftModel without a task type calls the base model directly."""
    kwargs = {"init_r": 6, "target_r": 2, "lora_alpha": 8, "total_step": 8, "target_modules": TARGETS[model_type],
              "task_type": "CAUSAL_LM", **kwargs}
    return peft.AdaLoraConfig(**kwargs)


def randomize(model, seed=0):
    """Non-trivial adapters (PEFT starts lora_E at zero): every trainable tensor ~ N(0, 0.3²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_pair(model_type, device="cpu", seed=0, **config):
    """(PEFT's AdaLoRA model, a patched deep copy of it), same weights."""
    pm = peft.get_peft_model(make_model(model_type), adalora_config(model_type, **config)).to(device)
    randomize(pm, seed)
    fm = copy.deepcopy(pm)
    assert fastpeft.patch(fm) is fm
    return pm, fm


def inputs_on(model_type, device, **kwargs):
    return {k: v.to(device) for k, v in make_inputs(model_type, **kwargs).items()}


def loss_and_grads(model, inputs):
    """(logits, loss, {name: grad}) of one forward with labels (AdaLoRA adds its regularizer to the loss)
    and a backward of the loss; grads of every trainable tensor and of the input embedding."""
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_rel(out, ref, what, tol=None):
    """fp32: relative (norm-wise) error within ``tol``: by default 1e-5 on the reference path, 1e-4
    through the kernels (other summation orders; test_model_kernels.py's bound for LoRA)."""
    if tol is None:
        tol = 1e-5 if fastpeft.get_options().backend == "reference" else 1e-4
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def count_calls(monkeypatch):
    """Counts of fastpeft's LoRA ops (per layer, fused MLP, q/k/v group) during a forward."""
    from fastpeft import functional

    calls = {"lora_linear": 0, "lora_mlp": 0, "lora_group": 0}
    for name in calls:
        real = getattr(functional, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(functional, name, counting)
    return calls


# --- numbers against PEFT ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_patched_adalora_equals_peft(model_type, backend, monkeypatch):
    pm, fm = peft_pair(model_type, backend)
    inputs = inputs_on(model_type, backend)
    out_p, loss_p, grads_p = loss_and_grads(pm, inputs)
    calls = count_calls(monkeypatch)
    out_f, loss_f, grads_f = loss_and_grads(fm, inputs)
    layers = len(pm.base_model.targeted_module_names)
    # every layer through fastpeft: alone, or in a q/k/v group or a fused GLU MLP (kernels only)
    assert calls["lora_linear"] + 3 * (calls["lora_group"] + calls["lora_mlp"]) == layers, calls
    if fastpeft.get_options().backend == "triton" and model_type == "llama":
        assert calls == {"lora_linear": 2, "lora_mlp": 2, "lora_group": 2}, calls
    assert_rel(out_f, out_p, "logits")
    assert_rel(loss_f, loss_p, "loss")
    names = {n for n in grads_p if "lora_" in n}
    assert {n.split(".lora_")[1][0] for n in names} == {"A", "B", "E"}
    assert set(grads_f) == set(grads_p) and len(names) == 3 * layers
    for name in grads_p:
        # lora_E's gradient sums over every token with heavy cancellation: fp32 roundoff alone puts PEFT's
        # own (llama, q/k_proj) 6-8e-6 from a float64 run and the reference path's up to 1.5e-5 (AMD EPYC)
        tol = 5e-5 if ".lora_E" in name and fastpeft.get_options().backend == "reference" else None
        assert_rel(grads_f[name], grads_p[name], f"grad {name}", tol)
    with torch.no_grad():  # the adapters are not a no-op
        assert not torch.allclose(logits(make_model(model_type).to(backend), inputs), out_f, atol=1e-3)


def test_bf16_by_reference_rule(backend):
    """bf16 base, fp32 adapters (PEFT's autocast_adapter_dtype): logits and grads as close to the same
    model in fp32 as PEFT in bf16 is (flash-attention's rule). Hidden 128, so the bf16 errors settle
    (test_model_kernels.py says why); lora_E (r values a layer) is compared as one vector over all layers
    for the same reason; the loss is a random projection of the logits (no regularizer: it is fp32 in
    every model alike)."""
    pm = peft.get_peft_model(make_model("llama", dtype=torch.bfloat16, hidden_size=128, intermediate_size=256),
                             adalora_config("llama")).to(backend)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "lora_E" in name else 0.1))
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "lora_" in n)
    ref, fm = copy.deepcopy(pm).float(), copy.deepcopy(pm)
    fastpeft.patch(fm)
    inputs = inputs_on("llama", backend)
    (out_r, grads_r), (out_p, grads_p), (out_f, grads_f) = (projected_grads(m, inputs) for m in (ref, pm, fm))
    assert out_f.dtype == torch.bfloat16
    assert_close(out_f, out_r, out_p, torch.bfloat16, "logits")
    assert set(grads_f) == set(grads_p) == set(grads_r)
    for grads in (grads_r, grads_p, grads_f):
        grads["every lora_E"] = torch.cat([g.flatten() for n, g in grads.items() if "lora_E" in n])
    for name in grads_r:
        assert grads_f[name].dtype == grads_p[name].dtype, name
        if "ranknum" in name or ".lora_E." in name:
            # ranknum: PEFT's autocast to fp32 re-creates it as a parameter that requires grad (over an fp32
            # base it stays frozen), so it gets a gradient, PEFT's and fastpeft's alike: -Σ dY ⊙ term / rn,
            # one scalar of cancelling terms that bf16 leaves as noise in both (PEFT's is off by up to 99%)
            continue
        assert_close(grads_f[name], grads_r[name], grads_p[name], torch.bfloat16, f"grad {name}")


def projected_grads(model, inputs):
    """(logits, {name: grad}) after a backward of a fixed random projection of the logits: every trainable
    tensor's gradient and the input embedding's."""
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(**inputs).logits
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device)
    (out.float() * w).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_includes_orth_regularizer():
    """The patched model's loss is cross-entropy + orth_reg_weight · PEFT's regularizer (mean over lora_A
    and lora_B of ‖P·Pᵀ − I‖ / ‖Pᵀ·P − I‖), as the unpatched model's."""
    pm, fm = peft_pair("llama", orth_reg_weight=0.7)
    inputs = make_inputs("llama")
    out = fm(**inputs, labels=inputs["input_ids"])
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten())
    regu = [torch.linalg.matrix_norm((p @ p.T if "lora_A" in n else p.T @ p) - torch.eye(6))
            for n, p in fm.named_parameters() if "lora_A" in n or "lora_B" in n]
    expected = ce + 0.7 * torch.stack(regu).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, pm(**inputs, labels=inputs["input_ids"]).loss, rtol=1e-6, atol=1e-6)
    assert out.loss - ce > 0.1


@torch.no_grad()
def test_dropout_eval_equals_peft_and_train_drops(backend):
    pm, fm = peft_pair("llama", backend, lora_dropout=0.3)
    inputs = inputs_on("llama", backend)
    pm.eval(), fm.eval()
    assert_rel(logits(fm, inputs), logits(pm, inputs), "eval logits")
    fm.train()
    torch.manual_seed(3)
    dropped = logits(fm, inputs)
    torch.manual_seed(3)
    torch.testing.assert_close(logits(fm, inputs), dropped, rtol=0, atol=0)  # the mask comes from the seed
    assert not torch.allclose(dropped, logits(pm.eval(), inputs), atol=1e-4)


# --- training with update_and_allocate ---------------------------------------------------------------
def _train(model, steps, inputs):
    """SGD steps with AdaLoRA's rank allocation after each; per step the loss, lora_E's zero pattern and
    the config's rank pattern."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    history = []
    for step in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        masks = {n: (p == 0).flatten().tolist() for n, p in model.named_parameters() if "lora_E" in n}
        history.append((loss.item(), masks, copy.deepcopy(model.peft_config["default"].rank_pattern)))
    return history


def test_update_and_allocate_equals_peft(backend):
    """total_step 8, tinit 1, tfinal 3: the budget shrinks at steps 2-4, step 5 fixes the final
    pattern, steps 6-7 re-apply it; both models mask the same singular values at every step."""
    pm, fm = peft_pair("llama", backend, tinit=1, tfinal=3)
    inputs = inputs_on("llama", backend, batch=2, seq=6)
    hist_p, hist_f = _train(pm, 8, inputs), _train(fm, 8, inputs)
    for step, ((loss_p, masks_p, pattern_p), (loss_f, masks_f, pattern_f)) in enumerate(zip(hist_p, hist_f)):
        assert loss_f == pytest.approx(loss_p, rel=1e-5), step
        assert masks_f == masks_p, f"step {step}: lora_E masks differ"
        assert pattern_f == pattern_p, f"step {step}: rank patterns differ"
    final = hist_f[-1][1]
    masked = sum(sum(m) for m in final.values())
    assert 0 < masked < sum(len(m) for m in final.values()), "the run never masked (or masked everything)"
    fp, pp = dict(fm.named_parameters()), dict(pm.named_parameters())
    for name, p in pp.items():
        if p.requires_grad:
            assert_rel(fp[name].detach(), p.detach(), f"trained {name}", tol=1e-4)


# --- save / load ----------------------------------------------------------------------------------------
@torch.no_grad()
def test_save_load_round_trips(tmp_path):
    """A trained (masked) adapter saved by the patched model loads into plain PEFT, resized by its rank
    pattern (one layer forced to rank 0), with the same outputs; saved by plain PEFT, it loads into a
    patched model with them too."""
    pm, fm = peft_pair("llama", tinit=1, tfinal=3)
    inputs = make_inputs("llama")
    with torch.enable_grad():
        _train(fm, 6, inputs)
    pattern = fm.peft_config["default"].rank_pattern
    zero = sorted(pattern)[0]
    pattern[zero] = [False] * len(pattern[zero])  # this layer's adapter drops out entirely
    fm.base_model.model.get_submodule(zero.rsplit(".lora_E", 1)[0]).lora_E["default"].zero_()
    fm.eval()
    expected = logits(fm, inputs)
    fm.save_pretrained(tmp_path / "patched")

    plain = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "patched").eval()
    ranks = {n: m.r["default"] for n, m in plain.named_modules() if hasattr(m, "lora_E")}
    assert min(ranks.values()) == 0 and max(ranks.values()) > 0, ranks
    assert_rel(logits(plain, inputs), expected, "PEFT loading the patched model's adapter")

    plain.save_pretrained(tmp_path / "plain")
    loaded = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "plain").eval()
    fastpeft.patch(loaded)
    assert_rel(logits(loaded, inputs), expected, "patched model loading PEFT's adapter")


# --- adapters: several, disabled, merged; unpatch ---------------------------------------------------------
@torch.no_grad()
def test_several_active_disabled_merged_unpatch(backend):
    pm = peft.get_peft_model(make_model("llama"), adalora_config("llama")).to(backend)
    pm.add_adapter("other", adalora_config("llama", target_modules=["q_proj", "down_proj"], inference_mode=True))
    g = torch.Generator().manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.base_model.set_adapter(["default", "other"])
    fm = copy.deepcopy(pm)
    fastpeft.patch(fm)
    inputs = inputs_on("llama", backend)
    assert_rel(logits(fm, inputs), logits(pm, inputs), "two active adapters")
    expected = check_one_disabled_merged(pm, fm, inputs, assert_rel,
                                         lambda model: [m for m in model.modules() if hasattr(m, "lora_E")])
    fastpeft.unmerge(fm)
    assert_rel(logits(fm, inputs), expected, "unmerged")
    layer = fm.base_model.model.model.layers[0].self_attn.q_proj
    assert "forward" in layer.__dict__
    fastpeft.unpatch(fm)
    assert "forward" not in layer.__dict__
    assert_rel(logits(fm, inputs), expected, "unpatched")


# --- what stays PEFT's -------------------------------------------------------------------------------
def test_4bit_base_keeps_peft_forward(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    try:
        bnb.functional.quantize_4bit(torch.randn(2, 64), blocksize=64, quant_type="nf4")
    except Exception as error:  # noqa: BLE001 - older bitsandbytes: no CPU quantize_4bit
        pytest.skip(f"this bitsandbytes cannot quantize 4-bit on CPU: {type(error).__name__}")
    make_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant,
                                                                 dtype=torch.bfloat16, device_map="cpu")
    pm = peft.get_peft_model(base, adalora_config("llama", target_modules=["q_proj", "v_proj"]))
    randomize(pm)
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = logits(pm, inputs)
    with pytest.warns(UserWarning, match=r"4 PEFT adapter layer\(s\) keep PEFT's forward.*SVDLinear4bit"):
        fastpeft.patch(pm)
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["LOHA", "LOKR", "OFT", "VERA"])
def test_unsupported_peft_method_names_itself(kind):
    configs = {
        "LOHA": lambda: peft.LoHaConfig(r=2, target_modules=["q_proj"]),
        "LOKR": lambda: peft.LoKrConfig(r=2, target_modules=["q_proj"]),
        "OFT": lambda: peft.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"]),
        "VERA": lambda: peft.VeraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    }
    pm = peft.get_peft_model(make_model("llama"), configs[kind]())
    with pytest.raises(ValueError, match=rf"adapter 'default' is {kind}, which fastpeft does not support"):
        fastpeft.patch(pm)
    assert not any("forward" in m.__dict__ for m in pm.modules())  # nothing changed
