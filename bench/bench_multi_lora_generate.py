"""Multi-LoRA serving end to end: batched greedy ``generate`` with a different adapter per sequence.

A Llama-shaped model from a config (hidden 2048, intermediate 5632, 8 layers, 32 heads, 4 KV heads,
vocab 32000, random weights, bf16), 32 LoRA adapters (r=16, alpha 32, all-linear, random A and B),
64 sequences of a 128-token prompt, sequence i with adapter i % 32, 64 new tokens each (greedy, no
early stop). Setups, timed in the same run (the median wall time of 3 generates after warm-up):

- ``base``: the model alone, no adapter (the floor);
- ``fastpeft``: ``fastpeft.MultiLora`` over the model, the 32 adapters loaded in slots, ``ml.use(names)``
  (its layers wide by size: the slots' A below the weight, one cuBLAS product, then the expand; in
  eager forwards q/k/v and gate/up as one product and one expand per group);
- ``fastpeft-apart``: the same with every layer on its own (FASTPEFT_MULTI_LORA_GROUP=0; eager only:
  compiled forwards run each layer on its own anyway);
- ``fastpeft-narrow``: the same with no wide layer (FASTPEFT_MULTI_LORA_WIDE=0: ``F.linear``, then the
  shrink and the expand in place);
- ``fastpeft-fused``: no wide layer, ``fastpeft.multi_lora.FUSE_BASE`` (each layer as
  ``multi_lora_linear``: the LoRA terms written, then cuBLAS's addmm adds the base product);
- ``peft``: PEFT's mixed batch, ``peft_model.generate(..., adapter_names=names)`` (eager only).

Cache: "dynamic" (eager, transformers' default) or "static" (``cache_implementation="static"``:
transformers compiles the decode step with torch.compile "reduce-overhead", CUDA graphs; how
serving engines run). Columns: tokens/s over all generated tokens, fastpeft / base, fastpeft / PEFT,
``same_tokens`` / ``same_first_token``: the share of sequences whose tokens (whose first new token)
equal PEFT's (random weights give near-tied logits: bf16 rounding parts greedy paths).

    pytest bench/bench_multi_lora_generate.py -s         # GPU only

Environment: FASTPEFT_GEN_CACHES [dynamic,static], FASTPEFT_GEN_NEW [64], FASTPEFT_GEN_PROMPT [128].
"""
from __future__ import annotations

import copy
import gc
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS  # noqa: E402

TABLE = "multi_lora_generate"
SEQS, ADAPTERS, RANK = 64, 32, 16
NEW = int(os.environ.get("FASTPEFT_GEN_NEW", "64"))
PROMPT = int(os.environ.get("FASTPEFT_GEN_PROMPT", "128"))
CACHES = [c for c in os.environ.get("FASTPEFT_GEN_CACHES", "dynamic,static").split(",") if c]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_STATE: dict = {}  # the session's models and tokens, built once


def _names():
    return [f"a{i % ADAPTERS}" for i in range(SEQS)]


def _setup():
    """(base model, PEFT model over a copy of it with the 32 adapters, the adapters' (state, config),
    prompt ids), built once per session."""
    if _STATE:
        return _STATE
    import peft
    from peft import get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    base.generation_config.pad_token_id = 0
    cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
    peft_model = None
    for i in range(ADAPTERS):
        if peft_model is None:
            peft_model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
        else:
            peft_model.add_adapter(f"a{i}", cfg)
    adapters = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_B") and hasattr(module, "lora_A"):
                for a in module.lora_B:
                    module.lora_B[a].weight.normal_(0, 0.02)
    for i in range(ADAPTERS):
        state = get_peft_model_state_dict(peft_model, adapter_name=f"a{i}")
        adapters[f"a{i}"] = ({k: v.detach().clone() for k, v in state.items()}, peft_model.peft_config[f"a{i}"].to_dict())
    peft_model = peft_model.to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(1, 32000, (SEQS, PROMPT), device="cuda", generator=gen)
    _STATE.update(base=base, peft=peft_model, adapters=adapters, ids=ids)
    return _STATE


def _generate(model, ids, cache: str, **kwargs):
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, **extra, **kwargs)


def _timed(fn, warmup: int, reps: int = 3):
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


SETUPS = ("base", "peft", "fastpeft", "fastpeft-apart", "fastpeft-narrow", "fastpeft-fused")
CASES = [(setup, cache) for cache in CACHES for setup in SETUPS
         if not (setup in ("peft", "fastpeft-apart") and cache == "static")]
SWITCHES = {"fastpeft": {}, "fastpeft-apart": {"FASTPEFT_MULTI_LORA_GROUP": "0"},
            "fastpeft-narrow": {"FASTPEFT_MULTI_LORA_WIDE": "0"}, "fastpeft-fused": {"FASTPEFT_MULTI_LORA_WIDE": "0"}}


@pytest.mark.parametrize("setup,cache", CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_generate(setup, cache, gpu_name, bench_record):
    pytest.importorskip("peft")
    state = _setup()
    ids, names = state["ids"], _names()
    warmup = 2 if cache == "static" else 1  # static: compile, then CUDA-graph recording
    torch._dynamo.reset()
    if setup == "base":
        seconds, out = _timed(lambda: _generate(state["base"], ids, cache), warmup)
    elif setup == "peft":
        # PEFT's mixed batch takes seconds a generate: one timed run, after the other setups warmed the GPU up
        seconds, out = _timed(lambda: _generate(state["peft"], ids, cache, adapter_names=names), 0, reps=1)
    else:
        import fastpeft
        from fastpeft import multi_lora
        from fastpeft.kernels import tuning

        with tuning.switched(SWITCHES[setup]):  # read when the MultiLora is made
            ml = fastpeft.MultiLora(state["base"], max_adapters=ADAPTERS, max_rank=RANK, target_modules=TARGETS)
        saved, multi_lora.FUSE_BASE = multi_lora.FUSE_BASE, setup == "fastpeft-fused"
        try:
            for name, adapter in state["adapters"].items():
                ml.load_adapter(name, adapter)
            with ml.use(names):
                seconds, out = _timed(lambda: _generate(state["base"], ids, cache), warmup)
        finally:
            multi_lora.FUSE_BASE = saved
            ml.close()
    new_tokens = out[:, PROMPT:]
    assert new_tokens.shape == (SEQS, NEW), f"{setup}: generated {tuple(new_tokens.shape)}"
    state.setdefault("tokens", {})[(setup, cache)] = new_tokens
    row = {"setup": setup, "cache": cache, "seqs": SEQS, "adapters": ADAPTERS if setup != "base" else 0,
           "new_tokens": NEW, "s": seconds, "tokens_per_s": SEQS * NEW / seconds}
    peft_tokens = state["tokens"].get(("peft", "dynamic"))
    if setup.startswith("fastpeft") and peft_tokens is not None:
        row["same_tokens"] = (new_tokens == peft_tokens).all(dim=1).float().mean().item()
        row["same_first_token"] = (new_tokens[:, 0] == peft_tokens[:, 0]).float().mean().item()
    bench_record(TABLE, row)
    gc.collect()
    torch.cuda.empty_cache()


def _derive(rows):
    by = {(r["setup"], r["cache"]): r for r in rows}
    for r in rows:
        base, peft_row = by.get(("base", r["cache"])), by.get(("peft", "dynamic"))
        r["vs_base"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["vs_peft"] = (r["tokens_per_s"] / peft_row["tokens_per_s"] if peft_row and r["setup"].startswith("fastpeft")
                        else None)
    return rows


RESULTS.derive(TABLE, _derive, note=(
    f"Llama hidden 2048, 8 layers, bf16, {SEQS} sequences x {PROMPT}-token prompt, {NEW} new tokens (greedy), "
    f"{ADAPTERS} adapters r={RANK} all-linear, sequence i with adapter i % {ADAPTERS}; tokens/s over generated "
    f"tokens; vs_base / vs_peft: tokens/s ratios (> 1 faster); static: cache_implementation='static' (torch.compile "
    f"reduce-overhead)."))
