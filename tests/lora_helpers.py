"""Helpers for the fastpeft-vs-PEFT comparisons: build both from one base, copy adapters across, run a step."""
from __future__ import annotations

import copy

import torch

import fastpeft
from fastpeft.peft_format import peft_state_dict


def peft_and_fastpeft(base, config_kwargs: dict, adapter_name: str = "default", peft_kwargs=None):
    """(peft_model, fastpeft_model) from deep copies of ``base`` with the same adapter weights."""
    import peft

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs), adapter_name=adapter_name,
                             **(peft_kwargs or {}))
    fm = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**config_kwargs), adapter_name=adapter_name)
    copy_peft_adapter(pm, fm, adapter_name)
    return pm, fm


def peft_state(pm, adapter_name: str = "default") -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(pm, adapter_name=adapter_name)


def copy_peft_adapter(pm, fm, adapter_name: str = "default") -> None:
    """Copy PEFT's adapter tensors into the fastpeft model; their checkpoint keys must be the same set."""
    src, dst = peft_state(pm, adapter_name), peft_state_dict(fm, adapter_name)
    assert set(src) == set(dst), f"key sets differ: only PEFT {sorted(set(src) - set(dst))[:4]}, only fastpeft {sorted(set(dst) - set(src))[:4]}"
    with torch.no_grad():
        for k, v in src.items():
            dst[k].copy_(v)


def randomize_lora_b(model, seed: int = 3) -> None:
    """Make default-initialised adapters non-trivial (B = 0 after init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def forward_backward(model, inputs, seed: int = 5):
    """logits and {name: grad} of every lora_A / lora_B and of the input embedding, after one backward."""
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = logits(model, inputs)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g).to(out.device)
    (out.float() * w).sum().backward()
    grads = {"embedding": emb.grad.detach().clone()}
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.grad is not None:
            key = name.removeprefix("base_model.model.").replace(".default.", ".")
            grads[key] = p.grad.detach().clone()
    return out.detach(), grads


def lora_module_names(model) -> set[str]:
    """Names (relative to the plain model) of every LoRA layer, fastpeft's or PEFT's."""
    from fastpeft.model_state import lora_layers

    return {n.removeprefix("base_model.model.") for n, _ in lora_layers(model)}


def train_step(model, inputs, seed: int = 3):
    """(logits, {name: grad}) of one forward+backward of mean(logits²) from a fixed seed (dropout)."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(**inputs).logits
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_one_disabled_merged(pm, fm, inputs, assert_rel, merged_layers):
    """PEFT model ``pm`` and its fastpeft-patched copy ``fm`` (a llama): with "default" the one active
    adapter fm gives pm's logits, with adapters disabled the plain model's, merged (PEFT's merge) the
    same as unmerged; ``merged_layers(model)``: the adapter layers that must report merged. Returns the
    one-adapter logits."""
    from tiny_models import make_model

    pm.base_model.set_adapter("default")
    fm.base_model.set_adapter("default")
    expected = logits(pm, inputs)
    assert_rel(logits(fm, inputs), expected, "one active adapter")
    device = next(iter(inputs.values())).device
    with fm.disable_adapter():
        assert_rel(logits(fm, inputs), logits(make_model("llama").to(device), inputs), "adapters disabled")
    fastpeft.merge(fm)  # PEFT's merge, layer by layer
    assert all(m.merged for m in merged_layers(fm))
    assert_rel(logits(fm, inputs), expected, "merged")
    return expected
