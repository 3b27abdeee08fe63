"""Whole models through the fused kernels (GPU, or the interpreter on CPU): PEFT parity, dropout
under activation checkpointing, CUDA graphs."""
import pytest
import torch

import fastpeft
from lora_helpers import copy_peft_adapter, forward_backward, peft_and_fastpeft, randomize_lora_b
from tiny_models import make_inputs, make_model
from tolerance import rel_err


@pytest.fixture
def kernels_on(kernel_device, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    return kernel_device


def _dtypes(device):
    return [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and Conv1D (fan_in_fan_out)
def test_patched_model_matches_peft(kernels_on, family):
    for dtype in _dtypes(kernels_on):
        base = make_model(family).to(kernels_on, dtype)
        cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
        pm, fm = peft_and_fastpeft(base, cfg)
        randomize_lora_b(pm)
        copy_peft_adapter(pm, fm)
        inputs = {k: v.to(kernels_on) for k, v in make_inputs(family).items()}
        out_p, grads_p = forward_backward(pm.to(kernels_on), inputs)
        out_f, grads_f = forward_backward(fm.to(kernels_on), inputs)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert rel_err(out_f, out_p) < tol, f"{family} {dtype} logits"
        assert set(grads_f) == set(grads_p)
        for name in grads_p:
            assert rel_err(grads_f[name].float(), grads_p[name].float()) < tol, f"{family} {dtype} grad {name}"


def test_dropout_under_gradient_checkpointing_gives_the_same_gradients(kernels_on):
    base = make_model("llama").to(kernels_on)
    model = fastpeft.patch(base, fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                                     target_modules="all-linear", init_lora_weights=False))
    model.config.use_cache = False
    inputs = {k: v.to(kernels_on) for k, v in make_inputs("llama").items()}
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    def grads(checkpointing):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.train()
        torch.manual_seed(1234)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        return loss.detach(), torch.autograd.grad(loss, lora)

    loss_plain, g_plain = grads(False)
    loss_ckpt, g_ckpt = grads(True)
    torch.manual_seed(99)  # a different seed gives different masks: the test can fail
    loss_other = model(**inputs, labels=inputs["input_ids"]).loss.detach()
    assert not torch.equal(loss_other, loss_plain)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cuda_graph_capture_replays_fused_layer(gpu):
    layer = fastpeft.LoraLinear(torch.nn.Linear(256, 192, device=gpu), r=8, lora_alpha=16, lora_dropout=0.1,
                                init_lora_weights=False).train()
    x = torch.randn(64, 256, device=gpu, requires_grad=True)
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    static_out = {}

    def step():
        y = layer(x)
        static_out["y"] = y
        static_out["grads"] = torch.autograd.grad(y.square().sum(), params)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    y1 = static_out["y"].clone()
    graph.replay()
    assert not torch.equal(y1, static_out["y"]), "each replay must draw a fresh dropout seed"
    layer.eval()  # without dropout the captured graph equals eager
    with torch.cuda.graph(graph2 := torch.cuda.CUDAGraph()):
        step()
    graph2.replay()
    eager = layer(x)
    torch.testing.assert_close(static_out["y"], eager)


def test_patched_model_compiles_without_graph_breaks(kernels_on):
    """torch.compile(fullgraph=True) of a whole patched model in training mode, dropout included."""
    model = fastpeft.patch(make_model("llama").to(kernels_on),
                           fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    model.train()
    inputs = {k: v.to(kernels_on) for k, v in make_inputs("llama").items()}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if kernels_on == "cuda" else "aot_eager")
    loss = compiled(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
