"""QLoRA: fastpeft over bitsandbytes 4-bit models (fastpeft/qlora.py) against PEFT over the same models,
and both against the truth: an fp32 model holding the dequantized 4-bit weights.

Tiny Llamas (hidden 64, so quantization blocks never straddle rows: bitsandbytes' CPU dequantize reads
straddling blocks wrongly) saved once and loaded with ``from_pretrained(..., quantization_config=
BitsAndBytesConfig(load_in_4bit=True, ...), device_map=<device>)``, NF4 and FP4, nested and not, bf16
compute. The reference path runs everywhere bitsandbytes can quantize; the kernels on the GPU or under
TRITON_INTERPRET=1 (``kernels_on``).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastpeft
from lora_helpers import copy_peft_adapter, forward_backward, logits, peft_state
from tiny_models import make_inputs, make_model
from tolerance import ATOL, rel_err

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SIZE = dict(hidden_size=64, intermediate_size=128)
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama checkpoint (fp32), saved once; skips where bitsandbytes cannot quantize 4-bit here."""
    try:
        bnb.functional.quantize_4bit(torch.randn(2, 64, device=_device()), blocksize=64, quant_type="nf4")
    except Exception as error:  # noqa: BLE001 - 0.45.5 has no CPU quantize_4bit
        pytest.skip(f"this bitsandbytes cannot quantize 4-bit on {_device()}: {type(error).__name__}"[:200])
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", **SIZE).save_pretrained(path)
    return path


def load_4bit(path, quant_type="nf4", nested=True, compute_dtype=torch.bfloat16, dtype=torch.bfloat16):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=compute_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype,
                                                                 device_map=_device())


def truth_model(path, model_4bit):
    """The fp32 model whose linear layers hold the 4-bit model's weights, dequantized by fastpeft's
    reference (which reads bitsandbytes' CPU layout too), everything else as saved."""
    from fastpeft import qlora

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(_device())
    quantized = dict(model_4bit.named_modules())
    for name, module in model.named_modules():
        q = quantized.get(name)
        if isinstance(module, nn.Linear) and q is not None and qlora.is_4bit(q):
            holder = nn.Module()
            holder.base_layer = q
            base = qlora.base_of(holder, q.weight)
            with torch.no_grad():
                module.weight.copy_(fastpeft.reference.dequantize_state(base.packed, base.state).float())
    return model.eval()


def _inputs():
    return {k: v.to(_device()) for k, v in make_inputs("llama").items()}


def assert_same(out, ref, what="", grad=False):
    """Bit for bit on CPU, where PEFT over bitsandbytes and fastpeft's reference path run the same torch
    ops; on a GPU within bf16 rounding (bitsandbytes hands cuBLAS W transposed: another algorithm),
    which a gradient, through the whole model's backward, compounds."""
    if out.device.type == "cpu":
        assert torch.equal(out, ref), what
    else:
        bound = 6e-2 if grad else 2e-2
        assert rel_err(out, ref) <= bound, f"{what}: {rel_err(out, ref):.3e}"


def _grad_errors(grads, truth):
    return {k: rel_err(grads[k], truth[k]) for k in truth}


def _check_against_truth(fast, ref, truth, what):
    """fastpeft's logits and gradients within the rule of the truth: err <= 2 x PEFT's own + atol."""
    (lf, gf), (lp, gp), (lt, gt) = fast, ref, truth
    atol = ATOL[torch.bfloat16]
    assert rel_err(lf, lt) <= 2 * rel_err(lp, lt) + atol, f"{what}: logits"
    ef, ep = _grad_errors(gf, gt), _grad_errors(gp, gt)
    assert set(ef) == set(gt)
    bad = {k: (round(ef[k], 4), round(ep[k], 4)) for k in ef if ef[k] > 2 * ep[k] + atol}
    assert not bad, f"{what}: gradients (fastpeft, PEFT) off the truth: {bad}"


def _three(path, quant_type, nested):
    """(fastpeft model, PEFT model, truth model with PEFT LoRA), the same adapter weights, train mode."""
    pm = peft.get_peft_model(load_4bit(path, quant_type, nested), peft.LoraConfig(**LORA))
    fm = fastpeft.patch(load_4bit(path, quant_type, nested), fastpeft.LoraConfig(**LORA))
    copy_peft_adapter(pm, fm)
    return fm.train(), pm.train(), _truth_with_adapter(path, fm, pm).train()


def _truth_with_adapter(path, model_4bit, pm):
    tm = peft.get_peft_model(truth_model(path, model_4bit), peft.LoraConfig(**LORA))
    peft.set_peft_model_state_dict(tm, peft_state(pm))
    return tm


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "absmax"])
def test_logits_and_grads_match_peft_reference_path(tiny_dir, quant_type, nested, set_options):
    set_options(backend="reference")
    fm, pm, tm = _three(tiny_dir, quant_type, nested)
    inputs = _inputs()
    fast, ref = forward_backward(fm, inputs), forward_backward(pm, inputs)
    # the reference path computes what PEFT over bitsandbytes computes, op for op
    assert_same(fast[0], ref[0], "logits")
    _check_against_truth(fast, ref, forward_backward(tm, inputs), f"{quant_type} nested={nested}")


@pytest.mark.parametrize("quant_type,nested,fused_max_m", [("nf4", True, None), ("fp4", False, None),
                                                           ("nf4", True, 0)], ids=["nf4", "fp4", "nf4-dequant"])
def test_logits_and_grads_kernels(tiny_dir, quant_type, nested, fused_max_m, kernels_on, monkeypatch):
    """The 4-bit kernels (the fused MLP and q/k/v groups on, as by default) within the rule: the
    decode kernel at these few rows; with FUSED_MAX_M = 0 the dequantize + dense route of large M."""
    from fastpeft import qlora

    if fused_max_m is not None:
        monkeypatch.setattr(qlora, "FUSED_MAX_M", fused_max_m)
    fm, pm, tm = _three(tiny_dir, quant_type, nested)
    inputs = _inputs()
    fast, ref = forward_backward(fm, inputs), forward_backward(pm, inputs)
    _check_against_truth(fast, ref, forward_backward(tm, inputs), f"kernels {quant_type} nested={nested}")


def test_params4bit_kept_in_place(tiny_dir):
    model = load_4bit(tiny_dir)
    before = {n: (m.weight, m.weight.data_ptr(), m.weight.quant_state) for n, m in model.named_modules()
              if type(m).__name__ == "Linear4bit"}
    fastpeft.patch(model, fastpeft.LoraConfig(**LORA))
    layers = {n.removesuffix(".base_layer"): m for n, m in model.named_modules() if n.endswith(".base_layer")}
    assert set(layers) == set(before)
    for name, layer in layers.items():
        weight, ptr, state = before[name]
        assert layer.weight is weight and weight.data_ptr() == ptr and weight.quant_state is state
        assert weight.dtype == torch.uint8 and not weight.requires_grad
    assert not any(p.dtype.is_floating_point and p.numel() >= 64 * 64 and "lora" not in n and p.requires_grad
                   for n, p in model.named_parameters())


def test_evaluate_then_train(tiny_dir, set_options):
    """An inference forward on the 4-bit model before training (bitsandbytes repacks each weight for
    its CPU kernel then, and its backward reads the repacked weight wrongly): fastpeft's gradients
    still within the rule of the truth, which holds the weights as the repacked layers compute them."""
    set_options(backend="reference")
    fm = load_4bit(tiny_dir)
    with torch.no_grad():
        fm.eval()(**_inputs())
    fastpeft.patch(fm, fastpeft.LoraConfig(**LORA))
    pm = peft.get_peft_model(load_4bit(tiny_dir), peft.LoraConfig(**LORA))
    copy_peft_adapter(pm, fm)
    tm = _truth_with_adapter(tiny_dir, fm, pm)
    inputs = _inputs()
    fast, truth = forward_backward(fm.train(), inputs), forward_backward(tm.train(), inputs)
    # the truth's own bf16 rounding aside, the same numbers: the fresh PEFT model is the error yardstick
    _check_against_truth(fast, forward_backward(pm.train(), inputs), truth, "evaluate then train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="bitsandbytes repacks 4-bit weights on CPU only")
def test_cpu_repacked_weight_read_as_bitsandbytes_computes(tiny_dir):
    """bitsandbytes' CPU layout (packing_format_for_cpu) read by fastpeft gives the weight its own CPU
    kernel multiplies by: probed with the identity, to its rounding (it scales in bf16: one bf16 step)."""
    from fastpeft import qlora

    model = load_4bit(tiny_dir).eval()
    layer = model.model.layers[0].mlp.down_proj
    K = layer.in_features
    eye = torch.eye(K, dtype=torch.bfloat16)
    with torch.no_grad():
        probe = layer(eye).t()  # its first inference forward repacks the weight
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    holder = nn.Module()
    holder.base_layer = layer
    base = qlora.base_of(holder, layer.weight)
    ours = fastpeft.reference.dequantize_state(base.packed, base.state).float()
    assert ((ours - probe.float()).abs() <= ours.abs() * 2.0**-7).all()


def test_patch_peft_qlora_model(tiny_dir, set_options):
    """fastpeft.patch(peft_model) on a PEFT QLoRA model: every lora.bnb.Linear4bit accelerated, no
    warning, PEFT's numbers, save_pretrained unchanged."""
    set_options(backend="reference")
    pm = peft.get_peft_model(load_4bit(tiny_dir), peft.LoraConfig(**LORA)).train()
    inputs = _inputs()
    before = forward_backward(pm, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fastpeft.patch(pm)
    layers = [m for m in pm.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
    assert layers and all(m.__dict__.get("_fastpeft_accelerated") for m in layers)
    after = forward_backward(pm, inputs)
    assert_same(after[0], before[0], "logits")
    for k in before[1]:
        assert_same(after[1][k], before[1][k], k, grad=True)


# Comparisons with PEFT over bitsandbytes on CPU run in train mode (no dropout: the same numbers):
# in eval mode without grad bitsandbytes' CPU kernel takes over, with bf16 block scales.
def test_adapters_both_ways_with_peft(tiny_dir, tmp_path, set_options):
    set_options(backend="reference")
    inputs = _inputs()
    fm = fastpeft.patch(load_4bit(tiny_dir), fastpeft.LoraConfig(**LORA)).train()
    fastpeft.save_adapter(fm, tmp_path / "fast")
    pm = peft.PeftModel.from_pretrained(load_4bit(tiny_dir), tmp_path / "fast").train()
    with torch.no_grad():
        assert_same(logits(fm, inputs), logits(pm, inputs), "fastpeft's adapter in PEFT")
    pm.save_pretrained(tmp_path / "peft")
    fm2 = fastpeft.load_adapter(load_4bit(tiny_dir), tmp_path / "peft").train()
    with torch.no_grad():
        assert_same(logits(fm2, inputs), logits(pm, inputs), "PEFT's adapter in fastpeft")


def test_merge_within_4bit_rounding(tiny_dir, set_options):
    """merge: W requantized from dequant(W) + s·BA with W's settings; the merged outputs differ from the
    unmerged by about the 4-bit rounding of W, and unpatch(merge=True) leaves Linear4bit layers."""
    set_options(backend="reference")
    model = fastpeft.patch(load_4bit(tiny_dir), fastpeft.LoraConfig(**LORA)).train()
    inputs = _inputs()
    with torch.no_grad():
        unmerged = logits(model, inputs).float()
        plain = logits(load_4bit(tiny_dir).train(), inputs).float()
        fastpeft.merge(model)
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.merged and type(layer.base_layer.weight).__name__ == "Params4bit"
        state = layer.base_layer.weight.quant_state
        assert (state.quant_type, state.nested, state.blocksize) == ("nf4", True, 64)
        merged = logits(model, inputs).float()
    # the adapter's effect is kept: the merged model is much closer to the unmerged than to the base
    assert rel_err(merged, unmerged) < 0.25 * rel_err(plain, unmerged)
    fastpeft.unmerge(model)
    with torch.no_grad():
        back = logits(model, inputs).float()
    assert rel_err(back, unmerged) < 0.25 * rel_err(plain, unmerged)
    fastpeft.merge(model)
    plain_model = fastpeft.unpatch(model, merge=True)
    assert type(plain_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_gradient_checkpointing_and_kbit_preparation(tiny_dir, set_options):
    """PEFT's prepare_model_for_kbit_training (fp32 norms, input grads, checkpointing) then fastpeft.patch:
    the same gradients with checkpointing as without."""
    set_options(backend="reference")
    grads = []
    for checkpointing in (False, True):
        model = load_4bit(tiny_dir)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                     gradient_checkpointing_kwargs={"use_reentrant": True})
        model = fastpeft.patch(model, fastpeft.LoraConfig(**LORA)).train()
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_" in name:
                with torch.no_grad():
                    p.copy_(torch.randn_like(p) * 0.05)
        grads.append(forward_backward(model, _inputs())[1])
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-3, atol=1e-5), k


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_generate_equals_peft(tiny_dir, set_options, backend, request):
    """Greedy generation from a patched 4-bit model: the tokens of PEFT over bitsandbytes (fp32 compute,
    so that ties from rounding do not decide), adapters on, then disabled (train mode: see above); the
    kernels run the decode kernel at every step (M = batch rows)."""
    if backend == "kernels":
        request.getfixturevalue("kernels_on")
    else:
        set_options(backend="reference")
    pm = peft.get_peft_model(load_4bit(tiny_dir, compute_dtype=torch.float32, dtype=torch.float32),
                             peft.LoraConfig(**LORA)).train()
    fm = fastpeft.patch(load_4bit(tiny_dir, compute_dtype=torch.float32, dtype=torch.float32),
                        fastpeft.LoraConfig(**LORA)).train()
    copy_peft_adapter(pm, fm)
    ids = _inputs()["input_ids"]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        _same_tokens(fm, pm, fm.generate(ids, **kwargs), pm.generate(ids, **kwargs))
        with pm.disable_adapter():
            base_tokens = pm.generate(ids, **kwargs)
        for layer in fm.modules():
            if isinstance(layer, fastpeft.LoraLinear):
                layer.enable_adapters(False)
        assert torch.equal(fm.generate(ids, **kwargs), base_tokens)


def _same_tokens(fm, pm, ours, theirs):
    """Greedy tokens equal, or (at the first that differs) a tie: PEFT's two best logits there within
    fp32 rounding of each other, and fastpeft's logits there within it of PEFT's."""
    if torch.equal(ours, theirs):
        return
    row, col = (ours != theirs).nonzero()[0].tolist()
    prefix = theirs[row:row + 1, :col]
    lf, lp = fm(prefix).logits[0, -1].float(), pm(prefix).logits[0, -1].float()
    top = lp.topk(2).values
    detail = f"tokens differ at row {row}, step {col}: PEFT's top two {top.tolist()}, max |diff| {(lf - lp).abs().max():.2e}"
    assert (top[0] - top[1]).abs() < 1e-4 * top.abs().max() + 1e-5, detail
    assert (lf - lp).abs().max() < 1e-4 * lp.abs().max() + 1e-5, detail


# --- bad input ----------------------------------------------------------------------------------
def _snapshot(model):
    return {n: (type(m), tuple(m._modules)) for n, m in model.named_modules()}


def test_8bit_layer_refused(tiny_dir):
    model = make_model("llama", **SIZE)
    model.model.layers[0].self_attn.q_proj = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    before = _snapshot(model)
    with pytest.raises(NotImplementedError, match="8-bit bitsandbytes.*load_in_8bit"):
        fastpeft.patch(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert _snapshot(model) == before


def test_unquantized_4bit_layer_refused():
    model = make_model("llama", **SIZE)
    model.model.layers[1].mlp.up_proj = bnb.nn.Linear4bit(64, 128, bias=False, quant_type="nf4")  # on no device yet
    before = _snapshot(model)
    with pytest.raises(ValueError, match="no quant_state"):
        fastpeft.patch(model, fastpeft.LoraConfig(r=4, target_modules=["up_proj"]))
    assert _snapshot(model) == before


def test_unsupported_quant_state_refused(tiny_dir):
    model = load_4bit(tiny_dir)
    layer = model.model.layers[0].self_attn.v_proj
    state = copy.copy(layer.weight.quant_state)
    layer.weight.quant_state = state
    before = _snapshot(model)
    state.quant_type = "int4"
    with pytest.raises(NotImplementedError, match="quant_type 'int4'"):
        fastpeft.patch(model, fastpeft.LoraConfig(r=4, target_modules=["v_proj"]))
    state.quant_type, state.blocksize = "nf4", 48
    with pytest.raises(NotImplementedError, match="blocksize 48"):
        fastpeft.patch(model, fastpeft.LoraConfig(r=4, target_modules=["v_proj"]))
    state.blocksize, state.shape = 64, torch.Size((64, 32))
    with pytest.raises(ValueError, match=r"holds a \(64, 32\) weight"):
        fastpeft.patch(model, fastpeft.LoraConfig(r=4, target_modules=["v_proj"]))
    assert _snapshot(model) == before


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_mixed_batch_over_4bit(tiny_dir, tmp_path, backend, request, set_options, monkeypatch):
    """PEFT's adapter_names= on a patched 4-bit model (two adapters loaded by name) and MultiLora over its
    Linear4bit layers: PEFT's mixed batch over the same 4-bit model (eval, as mixed batches require).
    With the kernels, the base product runs fastpeft's 4-bit kernels, not bitsandbytes' forward."""
    from fastpeft import qlora

    calls, real = [], qlora.linear_4bit
    monkeypatch.setattr(qlora, "linear_4bit", lambda *a: calls.append(1) or real(*a))
    if backend == "kernels":
        request.getfixturevalue("kernels_on")
    else:
        set_options(backend="reference")
    pm = peft.get_peft_model(load_4bit(tiny_dir), peft.LoraConfig(**LORA), adapter_name="one")
    pm.add_adapter("two", peft.LoraConfig(**dict(LORA, r=4, target_modules=["q_proj", "v_proj"])))
    pm.save_pretrained(tmp_path)
    pm.eval()
    fm = load_4bit(tiny_dir)
    for name in ("one", "two"):
        fastpeft.load_adapter(fm, tmp_path / name, adapter_name=name)
    fm.eval()
    rows = ["two", "__base__", "one"]
    inputs = {k: v.repeat(2, 1)[:3] for k, v in _inputs().items()}
    # PEFT rounds each adapter's term to bf16 before adding it; fastpeft adds in fp32 and rounds once
    close = dict(rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        expected = logits(pm, dict(inputs, adapter_names=rows)).float()
        torch.testing.assert_close(logits(fm, dict(inputs, adapter_names=rows)).float(), expected, **close)
        served = load_4bit(tiny_dir).eval()
        ml = fastpeft.MultiLora(served, max_adapters=2, max_rank=8, target_modules="all-linear")
        for name in ("one", "two"):
            ml.load_adapter(name, tmp_path / name)
        with ml.use(["two", None, "one"]):
            torch.testing.assert_close(logits(served, inputs).float(), expected, **close)
    assert bool(calls) == (backend == "kernels")


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_dora_over_4bit_equals_peft(tiny_dir, backend, request, set_options):
    """DoRA (use_dora=True) over the 4-bit base: fastpeft against PEFT's DoRA over bitsandbytes, the
    magnitude's gradient included; merged (requantized), the adapter's effect is kept."""
    if backend == "kernels":
        request.getfixturevalue("kernels_on")
    else:
        set_options(backend="reference")
    cfg = dict(LORA, use_dora=True)
    pm = peft.get_peft_model(load_4bit(tiny_dir), peft.LoraConfig(**cfg))
    fm = fastpeft.patch(load_4bit(tiny_dir), fastpeft.LoraConfig(**cfg))
    copy_peft_adapter(pm, fm)
    inputs = _inputs()
    (lf, gf), (lp, gp) = forward_backward(fm.train(), inputs), forward_backward(pm.train(), inputs)
    # bf16 model: the kernels round x·Wᵀ + s·(x·Aᵀ)·Bᵀ to bf16 before the magnitude scales it, PEFT's
    # DoRA terms stay fp32 until the sum
    bound = 1e-2 if backend == "reference" else 2e-2
    assert rel_err(lf, lp) <= bound, f"logits {rel_err(lf, lp):.3e}"
    mags = [n for n, p in fm.named_parameters() if "lora_magnitude_vector" in n]
    assert mags and all(p.grad is not None for n, p in fm.named_parameters() if n in mags)
    bad = {k: round(rel_err(gf[k], gp[k]), 4) for k in gp if rel_err(gf[k], gp[k]) > 3 * bound}
    assert not bad, f"gradients off PEFT's: {bad}"
    with torch.no_grad():  # as in test_merge_within_4bit_rounding: the adapter's effect is kept
        before = logits(fm, inputs).float()
        plain = logits(load_4bit(tiny_dir).train(), inputs).float()
        fastpeft.merge(fm)
        merged = logits(fm, inputs).float()
    assert type(fm.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert rel_err(merged, before) < 0.25 * rel_err(plain, before)
