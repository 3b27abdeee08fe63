"""Many adapters in one batch (fastpeft/multi_lora.py): PEFT's ``adapter_names=`` on patched models against
PEFT's own mixed batches, and the ``MultiLora`` serving wrapper against each row run alone with its
adapter; the reference path everywhere, the kernels on the GPU or under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastpeft
from lora_helpers import logits
from tiny_models import make_inputs, make_model

peft = pytest.importorskip("peft")

# three adapters: different ranks, alphas and targets (math skips the MLP, chat only q/v)
ADAPTERS = {
    "sql": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "math": dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "chat": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
}
ROWS = ["sql", "__base__", "math", "chat", "sql"]


def _backend(request, backend):
    if backend == "kernels":
        return request.getfixturevalue("kernels_on")
    request.getfixturevalue("set_options")(backend="reference")
    return "cpu"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """The three adapters trained nowhere (random B), saved by PEFT from one tiny Llama."""
    path = tmp_path_factory.mktemp("adapters")
    base = make_model("llama")
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
        pm.save_pretrained(path / name)
    return path


def _peft_all(adapter_dirs, device):
    pm = peft.PeftModel.from_pretrained(make_model("llama").to(device), adapter_dirs / "sql", adapter_name="sql")
    for name in ("math", "chat"):
        pm.load_adapter(adapter_dirs / name, adapter_name=name)
    return pm.eval()


def _fast_all(adapter_dirs, device):
    model = make_model("llama").to(device)
    for name in ADAPTERS:
        fastpeft.load_adapter(model, adapter_dirs / name, adapter_name=name)
    return model.eval()


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_adapter_names_equals_peft(adapter_dirs, backend, request):
    device = _backend(request, backend)
    pm, fm = _peft_all(adapter_dirs, device), _fast_all(adapter_dirs, device)
    inputs = {k: v.to(device) for k, v in make_inputs("llama", batch=len(ROWS)).items()}
    with torch.no_grad():
        expected = logits(pm, dict(inputs, adapter_names=ROWS))
        got = logits(fm, dict(inputs, adapter_names=ROWS))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(expected[0], expected[2], atol=1e-3)  # the rows really differ
        generate = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(fm.generate(inputs["input_ids"], adapter_names=ROWS, **generate),
                           pm.generate(inputs["input_ids"], adapter_names=ROWS, **generate))
        beams = dict(generate, num_beams=2)
        assert torch.equal(fm.generate(inputs["input_ids"], adapter_names=ROWS, **beams),
                           pm.generate(inputs["input_ids"], adapter_names=ROWS, **beams))
    assert not any(m._forward_pre_hooks for m in fm.modules() if isinstance(m, fastpeft.LoraLinear))


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_adapter_names_follow_weight_changes(adapter_dirs, backend, request):
    """A mixed batch keeps each layer's stacked adapters and launches for the forwards of one block
    (one model call, one generate); an adapter changed between blocks (in place, or a new Parameter)
    gives PEFT's new numbers."""
    from fastpeft.model_state import lora_layers

    device = _backend(request, backend)
    pm, fm = _peft_all(adapter_dirs, device), _fast_all(adapter_dirs, device)
    inputs = {k: v.to(device) for k, v in make_inputs("llama", batch=len(ROWS)).items()}
    generate = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for change in (None, "in place", "new parameter"):
            for model in (pm, fm):
                for _, layer in lora_layers(model):
                    if change == "in place" and "sql" in layer.lora_B:
                        layer.lora_B["sql"].weight.mul_(-3)
                    elif change == "new parameter" and "math" in layer.lora_A:
                        a = layer.lora_A["math"]
                        a.weight = torch.nn.Parameter(a.weight.flip(0))
            torch.testing.assert_close(logits(fm, dict(inputs, adapter_names=ROWS)),
                                       logits(pm, dict(inputs, adapter_names=ROWS)), rtol=1e-4, atol=1e-5)
            assert torch.equal(fm.generate(inputs["input_ids"], adapter_names=ROWS, **generate),
                               pm.generate(inputs["input_ids"], adapter_names=ROWS, **generate)), change


def test_adapter_names_encoder_decoder(tmp_path, set_options):
    """T5: the encoder and decoder layers each get the rows' adapters."""
    set_options(backend="reference")
    base = make_model("t5")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, init_lora_weights=False), adapter_name="first")
    pm.add_adapter("second", peft.LoraConfig(r=2, init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    fm = copy.deepcopy(base)
    fastpeft.load_adapter(fm, tmp_path / "first", adapter_name="first")
    fastpeft.load_adapter(fm, tmp_path / "second", adapter_name="second")
    pm.eval(), fm.eval()
    inputs = make_inputs("t5", batch=3)
    rows = ["second", "__base__", "first"]
    with torch.no_grad():
        torch.testing.assert_close(logits(fm, dict(inputs, adapter_names=rows)),
                                   logits(pm, dict(inputs, adapter_names=rows)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["t5", "gpt2", "falcon", "opt", "phi3", "gpt_neox"])
def test_mixed_batches_across_families(family, tmp_path, request):
    """Both ways in, every linear layer served, against PEFT's mixed batch: ``adapter_names=`` on a
    model with the adapters loaded by fastpeft, and MultiLora. T5's feed-forward reads
    ``wo.weight``'s dtype (MultiLoraLinear gives it, as PEFT's layers do); GPT-2's layers are Conv1D
    (weight stored (in, out): their own product, then the LoRA terms); Falcon and GPT-NeoX fuse q, k
    and v in one layer; Phi-3 fuses gate and up. OPT's decoder flattens its tokens to (rows × tokens,
    hidden) before the feed-forward, where PEFT's mixed batch raises (and so does fastpeft's, as
    PEFT's); MultiLora runs it, each row as that row alone with its adapter."""
    device = _backend(request, "kernels")
    base = make_model(family)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                  init_lora_weights=False), adapter_name="first")
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=5, target_modules="all-linear", init_lora_weights=False))
    pm.save_pretrained(tmp_path)  # PEFT saves each adapter not named "default" in its own folder
    fm = copy.deepcopy(base).to(device).eval()
    model = copy.deepcopy(base).to(device).eval()
    ml = fastpeft.MultiLora(model, max_adapters=2, max_rank=4, target_modules="all-linear")
    for name in ("first", "second"):
        fastpeft.load_adapter(fm, tmp_path / name, adapter_name=name)
        ml.load_adapter(name, tmp_path / name)
    assert len(ml.layers) == sum(1 for n, _ in pm.named_modules() if n.endswith(".lora_A"))
    inputs = {k: v.to(device) for k, v in make_inputs(family, batch=3).items()}
    rows = ["second", "__base__", "first"]
    pm = pm.eval().to(device)
    with torch.no_grad():
        alone = []
        for i, name in enumerate(rows):
            row = {k: v[i:i + 1] for k, v in inputs.items()}
            if name == "__base__":
                with pm.disable_adapter():
                    alone.append(logits(pm, row))
            else:
                pm.set_adapter(name)
                alone.append(logits(pm, row))
        alone = torch.cat(alone)
        if family == "opt":
            for mixed in (pm, fm):
                with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
                    mixed(**inputs, adapter_names=rows)
        else:
            want = logits(pm, dict(inputs, adapter_names=rows))
            torch.testing.assert_close(want, alone, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(logits(fm, dict(inputs, adapter_names=rows)), want, rtol=1e-4, atol=1e-5)
        with ml.use(rows):
            torch.testing.assert_close(logits(model, inputs), alone, rtol=1e-4, atol=1e-5)
    ml.close()


def test_adapter_names_errors_as_peft(adapter_dirs, set_options):
    set_options(backend="reference")
    fm = _fast_all(adapter_dirs, "cpu")
    inputs = make_inputs("llama", batch=len(ROWS))
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): nope"):
        fm(**inputs, adapter_names=["nope"] * len(ROWS))
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        fm(**inputs, adapter_names=ROWS[:2])
    with pytest.raises(TypeError, match="expected a list of str"):
        fm(**inputs, adapter_names="sql")
    fm.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        fm(**inputs, adapter_names=ROWS)
    fm.eval()
    fastpeft.merge(fm, adapter_names=["sql"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        fm(**inputs, adapter_names=ROWS)
    fastpeft.unmerge(fm)
    with torch.no_grad():  # after the errors: no hook left behind, the names work again
        fm(**inputs, adapter_names=ROWS)
        fm(**inputs, adapter_names=None)
    assert not any(m._forward_pre_hooks for m in fm.modules() if isinstance(m, fastpeft.LoraLinear))
    fastpeft.unpatch(fm)
    assert not fm._forward_pre_hooks and not fm._forward_hooks and "generate" not in fm.__dict__


# --- MultiLora ---------------------------------------------------------------------------------
def _alone(adapter_dirs, name, inputs, device):
    """Logits of the batch through PEFT with adapter ``name`` alone (None: the base model)."""
    base = make_model("llama").to(device).eval()
    if name is None:
        return logits(base, inputs)
    return logits(peft.PeftModel.from_pretrained(base, adapter_dirs / name).eval(), inputs)


@pytest.mark.parametrize("backend,route", [("reference", None), ("kernels", "in place"), ("kernels", "fused"),
                                           ("kernels", "wide")])
def test_multilora_rows_equal_each_adapter_alone(adapter_dirs, backend, route, request, monkeypatch):
    """MultiLora's rows against each adapter alone; with the kernels, over the in-place route, the
    fused one (multi_lora_linear: the LoRA terms written, then cuBLAS adds the base product) and wide
    layers (multi_lora_wide: the slots' A below the weight, no shrink); the reference path over layers
    wide by size. The kernels sort the rows by slot once per ``use`` (``segments``): the prompt's
    tokens and each decode step are grouped from that."""
    from fastpeft.kernels import multi_lora as kernels

    fused = route == "fused"
    if route is not None:  # the switches (kernels/tuning.py); unset, wide by size, else in place
        pin = request.getfixturevalue("pin_config")
        pin("FASTPEFT_MULTI_LORA_FUSED", "1" if fused else None)
        pin("FASTPEFT_MULTI_LORA_WIDE", "1" if route == "wide" else "0")
    calls = _spy(monkeypatch, "multi_lora_wide_plan" if route == "wide" else "multi_lora_linear_plan")
    sorts, real_segments = [], kernels.segments
    monkeypatch.setattr(kernels, "segments", lambda *a: sorts.append(1) or real_segments(*a))
    device = _backend(request, backend)
    model = make_model("llama").to(device).eval()
    ml = fastpeft.MultiLora(model, max_adapters=4, max_rank=8, target_modules="all-linear")
    for name in ADAPTERS:
        ml.load_adapter(name, adapter_dirs / name)
    assert ml.adapters() == list(ADAPTERS)
    rows = ["chat", None, "sql", "math", "sql"]
    inputs = {k: v.to(device) for k, v in make_inputs("llama", batch=len(rows)).items()}
    with torch.no_grad():
        with ml.use(rows):
            got = logits(model, inputs)
            tokens = model.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert len(sorts) == (backend == "kernels")
        for i, name in enumerate(rows):
            one = {k: v[i:i + 1] for k, v in inputs.items()}
            torch.testing.assert_close(got[i:i + 1], _alone(adapter_dirs, name, one, device), rtol=1e-4, atol=1e-5)
        fm = _fast_all(adapter_dirs, device)
        names = [n or "__base__" for n in rows]
        assert torch.equal(tokens, fm.generate(inputs["input_ids"], adapter_names=names, max_new_tokens=4,
                                                do_sample=False, pad_token_id=0))
        plain = logits(model, inputs)  # outside use(): the base model
        torch.testing.assert_close(plain, _alone(adapter_dirs, None, inputs, device), rtol=1e-5, atol=1e-6)
    assert bool(calls) == (route in ("fused", "wide"))
    assert all((layer._wide is not None) == (route in ("wide", None)) for layer in ml.layers.values())
    ml.close()
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters()), \
        "close() left parameters as views of a wide layer's buffer"


def _spy(monkeypatch, plan: str) -> list:
    """A list that grows by one each time a route's launches are worked out or looked up (the kernels'
    ``plan``: multi_lora_linear_plan for the fused route, multi_lora_wide_plan for wide layers)."""
    from fastpeft.kernels import multi_lora as kernels

    calls, real = [], getattr(kernels, plan)
    monkeypatch.setattr(kernels, plan, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("route", ["in place", "fused", "wide"])
def test_multilora_kept_launches_follow_changes(adapter_dirs, route, request, set_options, monkeypatch):
    """Each MultiLoraLinear keeps its last forward's launches (decode steps skip the launchers' keys):
    a new base weight (another Parameter), another dtype, another batch shape or the other route
    give the reference path's numbers, never the kept launches' stale ones; a wide layer widens
    again over the new weight and after ``.half()``."""
    device = request.getfixturevalue("kernels_on")
    pin = request.getfixturevalue("pin_config")
    fused = route == "fused"
    pin("FASTPEFT_MULTI_LORA_FUSED", "1" if fused else None)
    pin("FASTPEFT_MULTI_LORA_WIDE", "1" if route == "wide" else "0")
    calls = _spy(monkeypatch, "multi_lora_wide_plan" if route == "wide" else "multi_lora_linear_plan")
    model = make_model("llama").to(device).eval()
    ml = fastpeft.MultiLora(model, max_adapters=4, max_rank=8, target_modules="all-linear")
    for name in ADAPTERS:
        ml.load_adapter(name, adapter_dirs / name)
    rows = ["chat", None, "sql", "math"]
    inputs = {k: v.to(device) for k, v in make_inputs("llama", batch=len(rows)).items()}
    layer = ml.layers["model.layers.0.self_attn.q_proj"]

    def both(inputs):  # the kernels' logits, then the reference path's
        set_options(backend="triton")
        got = logits(model, inputs)
        set_options(backend="reference")
        want = logits(model, inputs)
        return got, want

    with torch.no_grad(), ml.use(rows):
        for step in ("first", "again", "new weight", "shorter", "fp16", "route"):
            if step == "new weight":
                layer.base_layer.weight = torch.nn.Parameter(layer.base_layer.weight * 2)
                layer.base_layer.bias = torch.nn.Parameter(torch.randn_like(layer.base_layer.weight[:, 0]))
            elif step == "shorter":
                inputs = {k: v[:, :-3] for k, v in inputs.items()}
            elif step == "fp16":
                model.half()
            elif step == "route":
                pin("FASTPEFT_MULTI_LORA_FUSED", None if fused else "1")
            got, want = both(inputs)
            tol = dict(rtol=2e-3, atol=2e-3) if step in ("fp16", "route") else dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{step}: {m}")
            assert (layer._wide is not None) == (route == "wide")
    assert bool(calls)


def test_multilora_sibling_groups(adapter_dirs, request, set_options, monkeypatch):
    """Wide q/k/v and gate/up layers of one module run as one product and one expand per group
    (``_Siblings``, multi_lora_wide_group) and give the ungrouped layers' logits; a replaced weight or
    ``.half()`` groups the layers again; a sibling called after an adapter was reloaded, or on an input
    modified in place, computes its own output again, and a group whose outputs went unused twice
    stops; FASTPEFT_MULTI_LORA_GROUP=0 keeps them apart; q and v served without k make a group."""
    device = request.getfixturevalue("kernels_on")
    pin = request.getfixturevalue("pin_config")
    pin("FASTPEFT_MULTI_LORA_WIDE", "1")
    calls = _spy(monkeypatch, "multi_lora_wide_group_plan")
    rows = ["chat", None, "sql", "math"]
    inputs = {k: v.to(device) for k, v in make_inputs("llama", batch=len(rows)).items()}

    def served(group: str):
        pin("FASTPEFT_MULTI_LORA_GROUP", group)
        model = make_model("llama").to(device).eval()
        ml = fastpeft.MultiLora(model, max_adapters=4, max_rank=8, target_modules="all-linear")
        for name in ADAPTERS:
            ml.load_adapter(name, adapter_dirs / name)
        return model, ml

    apart, ml_apart = served("0")
    assert not ml_apart._siblings and all(layer._siblings is None for layer in ml_apart.layers.values())
    model, ml = served("1")
    blocks = len(model.model.layers)
    assert len(ml._siblings) == 2 * blocks and [len(g.layers) for g in ml._siblings[:2]] == [3, 2]
    attn = model.model.layers[0].self_attn
    alone = [ml_apart.model.model.layers[0].self_attn.get_submodule(n) for n in ("q_proj", "k_proj", "v_proj")]
    with torch.no_grad(), ml.use(rows), ml_apart.use(rows):
        torch.testing.assert_close(logits(model, inputs), logits(apart, inputs), rtol=1e-5, atol=1e-6)
        assert calls
        assert all(g.pending is None for g in ml._siblings), "an output was kept past its forward"
        attn.q_proj.base_layer.weight = torch.nn.Parameter(attn.q_proj.base_layer.weight * 2)
        alone[0].base_layer.weight = torch.nn.Parameter(alone[0].base_layer.weight * 2)
        torch.testing.assert_close(logits(model, inputs), logits(apart, inputs), rtol=1e-5, atol=1e-6)
        assert attn.q_proj._siblings is not None and attn.q_proj._wide[0].data_ptr() == \
            ml._siblings[0].group[0].data_ptr(), "the replaced weight was not grouped again"
        x = torch.randn(len(rows), 3, attn.q_proj.in_features, device=device)
        attn.q_proj(x)
        for m in (ml, ml_apart):  # "sql" reloaded with math's weights between q's call and k's
            m.unload_adapter("sql")
            m.load_adapter("sql", adapter_dirs / "math")
        torch.testing.assert_close(attn.k_proj(x), alone[1](x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attn.v_proj(x), alone[2](x), rtol=1e-5, atol=1e-6)
        assert ml._siblings[0].misses == 1  # q's k and v, dropped
        torch.testing.assert_close(attn.q_proj(x), alone[0](x), rtol=1e-5, atol=1e-6)  # computed at k's call
        assert ml._siblings[0].pending is None
        attn.q_proj(x)
        x.mul_(2)  # modified in place after q: k computes again, and the group, twice missed, stops
        torch.testing.assert_close(attn.k_proj(x), alone[1](x), rtol=1e-5, atol=1e-6)
        assert attn.q_proj._siblings is None and attn.k_proj._siblings is None
        other = torch.randn_like(x)
        torch.testing.assert_close(attn.q_proj(x), alone[0](x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attn.k_proj(other), alone[1](other), rtol=1e-5, atol=1e-6)
        model.half()
        apart.half()
        torch.testing.assert_close(logits(model, inputs), logits(apart, inputs), rtol=2e-3, atol=2e-3)
        assert model.model.layers[1].mlp.up_proj._siblings is not None
    layers = list(ml.layers.values())
    ml.close()
    assert all(layer._siblings is None for layer in layers)
    ml_apart.close()
    pin("FASTPEFT_MULTI_LORA_GROUP", None)
    model = make_model("llama").to(device).eval()
    ml = fastpeft.MultiLora(model, max_adapters=4, max_rank=8, target_modules=["q_proj", "v_proj", "up_proj"])
    ml.load_adapter("chat", adapter_dirs / "chat")  # q and v: grouped, k (not served) between their calls
    assert [len(g.layers) for g in ml._siblings] == [2] * blocks
    rows = ["chat", None, "chat", None]
    with torch.no_grad(), ml.use(rows):
        got = logits(model, inputs)
    for i, name in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        torch.testing.assert_close(got[i:i + 1], _alone(adapter_dirs, name, one, device), rtol=1e-4, atol=1e-5)
    ml.close()


def test_multilora_prefill_tma_route(adapter_dirs, request, set_options, monkeypatch):
    """bf16 layers over the TMA matmul with the LoRA terms in its epilogue (FASTPEFT_MULTI_LORA_TMA=1:
    any batch the operands allow) give the reference path's rows, eagerly and under torch.compile;
    unset, only a prefill batch takes it (``prefill_tma``)."""
    from fastpeft.multi_lora import TMA_MIN_RUN, TMA_MIN_TOKENS, prefill_tma

    device = request.getfixturevalue("kernels_on")
    pin = request.getfixturevalue("pin_config")
    pin("FASTPEFT_MULTI_LORA_TMA", "1")
    calls = _spy(monkeypatch, "multi_lora_linear_tma_plan")
    model = make_model("llama", dtype=torch.bfloat16).to(device).eval()
    ml = fastpeft.MultiLora(model, max_adapters=4, max_rank=8, target_modules="all-linear")
    for name in ADAPTERS:
        ml.load_adapter(name, adapter_dirs / name)
    inputs = {k: v.to(device) for k, v in make_inputs("llama", batch=4).items()}
    with torch.no_grad(), ml.use(["chat", None, "sql", "math"]):
        got = logits(model, inputs)
        assert calls
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs).logits
        torch._dynamo.reset()
        set_options(backend="reference")
        want = logits(model, inputs)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(compiled.float(), got.float(), rtol=0, atol=0)
    layer = ml.layers["model.layers.0.self_attn.q_proj"].base_layer
    K = layer.in_features
    prefill = torch.zeros(TMA_MIN_TOKENS // TMA_MIN_RUN, TMA_MIN_RUN, K, dtype=torch.bfloat16, device=device)
    assert prefill_tma(layer, prefill[:1], (), {})  # pinned: any batch
    pin("FASTPEFT_MULTI_LORA_TMA", None)
    assert prefill_tma(layer, prefill, (), {})
    assert not prefill_tma(layer, prefill[1:], (), {})  # too few tokens
    assert not prefill_tma(layer, prefill.reshape(-1, TMA_MIN_RUN // 2, K), (), {})  # rows too short: decode-like
    assert not prefill_tma(layer, prefill.float(), (), {})
    pin("FASTPEFT_MULTI_LORA_TMA", "0")
    assert not prefill_tma(layer, prefill, (), {})
    ml.close()


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_multilora_compiles_whole(adapter_dirs, backend, request):
    """Under torch.compile(fullgraph=True) each layer's adapters are one op (fastpeft::multi_lora_), the
    hooks traced away: the compiled model's rows equal the eager ones."""
    device = _backend(request, backend)
    model = make_model("llama").to(device).eval()
    ml = fastpeft.MultiLora(model, max_adapters=4, max_rank=8, target_modules="all-linear")
    for name in ADAPTERS:
        ml.load_adapter(name, adapter_dirs / name)
    inputs = {k: v.to(device) for k, v in make_inputs("llama", batch=4).items()}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), ml.use(["chat", None, "sql", "math"]):
        eager = logits(model, inputs)
        torch.testing.assert_close(compiled(**inputs).logits, eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_multilora_static_cache_generate(adapter_dirs, gpu):
    """generate with a static cache (transformers compiles the decode step, "reduce-overhead": CUDA
    graphs) gives the eager mixed batch's tokens."""
    model = make_model("llama").to(gpu).eval()
    ml = fastpeft.MultiLora(model, max_adapters=4, max_rank=8, target_modules="all-linear")
    for name in ADAPTERS:
        ml.load_adapter(name, adapter_dirs / name)
    inputs = {k: v.to(gpu) for k, v in make_inputs("llama", batch=4).items()}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    with torch.no_grad(), ml.use(["chat", None, "sql", "math"]):
        eager = model.generate(inputs["input_ids"], **kwargs)
        for _ in range(2):  # compile, then record the graphs
            static = model.generate(inputs["input_ids"], cache_implementation="static", **kwargs)
    assert torch.equal(static, eager)
    torch._dynamo.reset()


def test_multilora_slots_reused_and_errors(adapter_dirs, set_options, tmp_path):
    set_options(backend="reference")
    model = make_model("llama").eval()
    ml = fastpeft.MultiLora(model, max_adapters=2, max_rank=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert ml.load_adapter("math", adapter_dirs / "math") == 0
    with pytest.raises(ValueError, match="rank 8 .* above max_rank=4"):
        ml.load_adapter("chat", adapter_dirs / "chat")
    with pytest.raises(ValueError, match="targets .*mlp.*not one of the served layers"):
        ml.load_adapter("sql", adapter_dirs / "sql")
    assert ml.adapters() == ["math"]  # the failed loads left the set as it was
    state = {k: v for k, v in _peft_state(adapter_dirs / "sql").items() if "mlp" not in k}
    assert ml.load_adapter("sql", (state, {"r": 4, "lora_alpha": 8})) == 1
    with pytest.raises(RuntimeError, match="all 2 slots are in use"):
        ml.load_adapter("again", adapter_dirs / "math")
    with pytest.raises(ValueError, match="already loaded"):
        ml.load_adapter("math", adapter_dirs / "math")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        with ml.use(["nope"]):
            pass
    ml.unload_adapter("math")
    assert ml.load_adapter("math2", adapter_dirs / "math") == 0  # the freed slot
    with pytest.raises(KeyError, match="no adapter named 'math'"):
        ml.unload_adapter("math")
    inputs = make_inputs("llama", batch=2)

    def load_during_forward(module, args):
        ml.load_adapter("late", adapter_dirs / "math")

    handle = model.model.layers[0].register_forward_pre_hook(load_during_forward)
    with pytest.raises(RuntimeError, match="cannot load an adapter while a forward runs"), ml.use(["sql", None]):
        model(**inputs)
    handle.remove()
    assert ml.adapters() == ["math2", "sql"]
    with torch.no_grad(), ml.use(["sql", "math2"]):
        model(**inputs)  # the failed call left nothing running
    restored = ml.close()
    assert type(restored.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def _peft_state(directory):
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def test_example_runs():
    """examples/multi_lora_generate.py on a tiny model: every batched row equals its adapter alone."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "examples", "multi_lora_generate.py"), "--device", "cpu",
                           "--new-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "every row equals its adapter alone" in done.stdout
