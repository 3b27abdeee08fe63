"""One training step of a Llama-shaped model: frozen base (the floor), PEFT LoRA, fastpeft LoRA.

LlamaForCausalLM from a config (hidden 2048, intermediate 5632, 8 layers, 32 heads, 4 KV heads,
vocab 32000), random weights, bf16, batch 4 x 2048 tokens, AdamW, the mean of 10 steps after 3
warm-up steps (docs/performance.md, Method). LoRA: r=16, alpha 32, all-linear, dropout
0.05 and 0. "frozen" trains only the input embedding, so the backward still runs through every
layer (dX everywhere): the cost LoRA adds on top of that is what fastpeft attacks.

    pytest bench/bench_e2e.py              # GPU only; the table prints at the end
    FASTPEFT_E2E_LAYERS=2 FASTPEFT_E2E_SEQ=512 pytest bench/bench_e2e.py    # a smaller model

Environment (defaults in brackets): FASTPEFT_E2E_HIDDEN [2048], _INTERMEDIATE [5632], _LAYERS [8],
_HEADS [32], _KV_HEADS [4], _VOCAB [32000], _BATCH [4], _SEQ [2048], _STEPS [10], _WARMUP [3],
_RANK [16].
"""
from __future__ import annotations

import gc
import os
import time

import pytest
import torch
from common import RESULTS, register


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(f"FASTPEFT_E2E_{name}", "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"FASTPEFT_E2E_{name} must be an integer, got {value!r}") from None


SIZE = dict(
    hidden=_env_int("HIDDEN", 2048),
    intermediate=_env_int("INTERMEDIATE", 5632),
    layers=_env_int("LAYERS", 8),
    heads=_env_int("HEADS", 32),
    kv_heads=_env_int("KV_HEADS", 4),
    vocab=_env_int("VOCAB", 32000),
    batch=_env_int("BATCH", 4),
    seq=_env_int("SEQ", 2048),
)
STEPS, WARMUP, RANK = _env_int("STEPS", 10), _env_int("WARMUP", 3), _env_int("RANK", 16)
TABLE = "e2e_train_step"

CASES = [  # (setup, lora dropout)
    ("frozen", None),
    ("peft", 0.05),
    ("peft", 0.0),
    ("fastpeft", 0.05),
    ("fastpeft", 0.0),
]


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=SIZE["vocab"],
        hidden_size=SIZE["hidden"],
        intermediate_size=SIZE["intermediate"],
        num_hidden_layers=SIZE["layers"],
        num_attention_heads=SIZE["heads"],
        num_key_value_heads=SIZE["kv_heads"],
        max_position_embeddings=max(SIZE["seq"], 2048),
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16)


def prepare(setup: str, dropout: float | None):
    """The model of one case, with only what that case trains left requiring grad."""
    model = build_model()
    if setup == "frozen":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        return model
    kwargs = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules="all-linear")
    if setup == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    import fastpeft

    return fastpeft.patch(model, fastpeft.LoraConfig(**kwargs))


def training_case(setup: str, dropout: float | None):
    """(case, step): a dict holding the case's model, optimizer and tokens (the same tokens for every
    case), and a function running one AdamW step on them that returns the loss. Dropping the dict
    frees the case (pytest-benchmark may keep ``step`` alive; it holds only the dict)."""
    case = {"model": prepare(setup, dropout).train()}
    case["opt"] = torch.optim.AdamW([p for p in case["model"].parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    case["input_ids"] = torch.randint(0, SIZE["vocab"], (SIZE["batch"], SIZE["seq"]), device="cuda", generator=gen)

    def step():
        loss = case["model"](input_ids=case["input_ids"], labels=case["input_ids"]).loss
        loss.backward()
        case["opt"].step()
        case["opt"].zero_grad(set_to_none=True)
        return loss

    return case, step


def _derive(rows: list[dict]) -> list[dict]:
    """Ratios against the frozen floor and against PEFT with the same dropout, from this run."""
    frozen = next((r for r in rows if r["setup"] == "frozen"), None)
    peft_rows = {r["dropout"]: r for r in rows if r["setup"] == "peft"}
    for r in rows:
        r["step_vs_frozen"] = r["step_ms"] / frozen["step_ms"] if frozen else None
        r["peak_vs_frozen"] = r["peak_gib"] / frozen["peak_gib"] if frozen else None
        ref = peft_rows.get(r["dropout"])
        r["step_vs_peft"] = r["step_ms"] / ref["step_ms"] if ref is not None and r["setup"] != "frozen" else None
    return rows


RESULTS.derive(
    TABLE,
    _derive,
    note=(f"LlamaForCausalLM hidden {SIZE['hidden']}, intermediate {SIZE['intermediate']}, {SIZE['layers']} layers, "
          f"{SIZE['heads']} heads / {SIZE['kv_heads']} KV, vocab {SIZE['vocab']}, bf16, batch {SIZE['batch']} x "
          f"{SIZE['seq']} tokens, AdamW, mean of {STEPS} steps after {WARMUP} warm-up; LoRA r={RANK}, "
          f"alpha {2 * RANK}, all-linear. *_vs_* < 1 is faster / smaller."),
)


@pytest.mark.parametrize("setup,dropout", CASES,
                         ids=[s if p is None else f"{s}-dropout{p:g}" for s, p in CASES])
def test_train_step(setup, dropout, gpu_name, bench_record, benchmark):
    if setup == "peft":
        pytest.importorskip("peft")
    gc.collect()
    torch.cuda.empty_cache()
    # Everything of this case lives in `case`, cleared at the end, so the next case's peak memory
    # does not include this one's model.
    case, step = training_case(setup, dropout)
    trainable = sum(p.numel() for p in case["model"].parameters() if p.requires_grad)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    host_start = time.perf_counter()
    for _ in range(STEPS):
        loss = step()
    host_ms = (time.perf_counter() - host_start) * 1e3 / STEPS  # ≈ step_ms when the host is the limit
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / STEPS
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    assert torch.isfinite(loss).item(), f"{setup}: non-finite loss {loss.item()}"
    tokens = SIZE["batch"] * SIZE["seq"]
    row = {"setup": setup, "dropout": dropout, "step_ms": step_ms, "host_ms": host_ms, "tokens_per_s": tokens / (step_ms / 1e3),
           "peak_gib": peak_gib, "trainable": trainable}
    bench_record(TABLE, row)
    # pytest-benchmark's record of the same step (a few more synchronized steps, not the table's numbers).
    register(benchmark, step, rounds=3, warmup_rounds=0, gpu=gpu_name, **row)
    case.clear()
    del loss
    gc.collect()
    torch.cuda.empty_cache()
