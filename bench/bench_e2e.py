"""One training step of a Llama-shaped model: frozen base (the floor), PEFT LoRA, fastpeft LoRA, over a
bf16 base and over the same base in 4-bit (QLoRA); PEFT's (IA)³ and AdaLoRA, and the same PeftModels
after ``fastpeft.patch``, over the bf16 base.

LlamaForCausalLM from a config (hidden 2048, intermediate 5632, 8 layers, 32 heads, 4 KV heads,
vocab 32000), random weights, bf16, batch 4 x 2048 tokens, AdamW, the mean of 10 steps after 3
warm-up steps (docs/performance.md, Method). LoRA: r=16, alpha 32, all-linear, dropout
0.05 and 0. "frozen" trains only the input embedding, so the backward still runs through every
layer (dX everywhere): the cost LoRA adds on top of that is what fastpeft attacks.

The 4-bit base (``base`` "nf4", test ids ``*-4bit*``): the same bf16 model, saved once per session
and loaded with transformers' ``BitsAndBytesConfig`` (NF4, double quantization, bf16 compute), so
every linear layer of the decoder is a ``bitsandbytes.nn.Linear4bit`` (embeddings and lm_head stay
bf16). PEFT wraps it with ``get_peft_model`` alone, without ``prepare_model_for_kbit_training``
(which would add gradient checkpointing and fp32 casts): the same workload for PEFT and fastpeft.
``step_vs_frozen`` and ``step_vs_peft`` compare rows of the same base. Where fastpeft.patch raises
NotImplementedError for a 4-bit base, its row records no time and the case is skipped.

(IA)³ and AdaLoRA (bf16 base, setups ``peft-ia3`` / ``fastpeft-ia3`` / ``peft-adalora`` /
``fastpeft-adalora``, column ``method``): PEFT builds the model (task type CAUSAL_LM, so AdaLoRA's
loss carries its orthogonality regularizer), the fastpeft rows are the same PeftModel after
``fastpeft.patch(peft_model)``. IA3Config() with PEFT's Llama defaults (k_proj, v_proj and down_proj,
down_proj feedforward); AdaLoraConfig(init_r=16, target_r=8, lora_alpha=32, total_step=100000) on q, k,
v, o, gate, up and down, each step followed by ``update_and_allocate`` (PEFT's RankAllocator, the same
work in both rows). ``step_vs_peft`` compares with PEFT's row of the same method.

    pytest bench/bench_e2e.py              # GPU only; the table prints at the end
    pytest bench/bench_e2e.py -k 4bit      # the 4-bit cases only (or FASTPEFT_E2E_BASES=nf4)
    FASTPEFT_E2E_LAYERS=2 FASTPEFT_E2E_SEQ=512 pytest bench/bench_e2e.py    # a smaller model

Environment (defaults in brackets): FASTPEFT_E2E_HIDDEN [2048], _INTERMEDIATE [5632], _LAYERS [8],
_HEADS [32], _KV_HEADS [4], _VOCAB [32000], _BATCH [4], _SEQ [2048], _STEPS [10], _WARMUP [3],
_RANK [16], _BASES [bf16,nf4]: the bases to run, "bf16", "nf4" or both (comma-separated),
_METHODS [lora,dora,ia3,adalora]: the adapter methods to run (comma-separated; "dora" is LoRA with
use_dora=True, setups "peft-dora" / "fastpeft-dora" with both dropouts; the 4-bit base runs LoRA and DoRA,
(IA)³ and AdaLoRA run on the bf16 base only; the frozen floor always runs). ``step_vs_peft`` compares
with PEFT's row of the same method, base and dropout.

    FASTPEFT_E2E_METHODS=ia3,adalora pytest bench/bench_e2e.py    # (IA)³ and AdaLoRA against the floor
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
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
BASE_NAMES = ("bf16", "nf4")


def _choices(variable: str, value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """An environment list (comma- or space-separated) of some of ``allowed``, in allowed's order; empty
    means all."""
    names = tuple(v for v in value.replace(",", " ").split() if v)
    if any(v not in allowed for v in names):
        raise ValueError(f"{variable} must name some of {', '.join(allowed)}, got {value!r}")
    return tuple(b for b in allowed if b in names) if names else allowed


BASES = _choices("FASTPEFT_E2E_BASES", os.environ.get("FASTPEFT_E2E_BASES", ""), BASE_NAMES)
METHOD_NAMES = ("lora", "dora", "ia3", "adalora")
DROPOUT_METHODS = ("lora", "dora")  # the LoRA-config methods: both dropouts, both bases
METHODS = _choices("FASTPEFT_E2E_METHODS", os.environ.get("FASTPEFT_E2E_METHODS", ""), METHOD_NAMES)


def _setup(impl: str, method: str) -> str:
    return impl if method == "lora" else f"{impl}-{method}"


CASES = [  # (base, setup, lora dropout); the 4-bit base only where LoRA or DoRA runs
    (base, setup, dropout)
    for base in BASES if base == "bf16" or any(m in METHODS for m in DROPOUT_METHODS)
    for setup, dropout in (("frozen", None),) + tuple(
        (_setup(impl, method), p) for method in METHODS if method in DROPOUT_METHODS
        for impl in ("peft", "fastpeft") for p in (0.05, 0.0))
] + [("bf16", f"{side}-{method}", None) for method in METHODS if method not in DROPOUT_METHODS
     for side in ("peft", "fastpeft")]


def method_of(setup: str) -> str | None:
    """The adapter method of a setup: "lora" for "peft" / "fastpeft", "dora" for "peft-dora", ...; None
    for "frozen"."""
    if setup == "frozen":
        return None
    return setup.split("-", 1)[1] if "-" in setup else "lora"


def case_id(base: str, setup: str, dropout: float | None) -> str:
    """The test id: "peft-dropout0.05" over the bf16 base, "peft-4bit-dropout0.05" over the 4-bit one."""
    name = setup if base == "bf16" else f"{setup}-4bit"
    return name if dropout is None else f"{name}-dropout{dropout:g}"


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


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def load_4bit(checkpoint: str):
    """build_model()'s model saved at ``checkpoint``, loaded with its linear layers in NF4 (double
    quantization, bf16 compute), as a QLoRA run loads its base."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=quant, device_map="cuda",
                                            **_dtype_kwarg(torch.bfloat16))


def prepare(base: str, setup: str, dropout: float | None, checkpoint: str | None = None):
    """The model of one case, with only what that case trains left requiring grad; the "nf4" base
    loads ``checkpoint`` (see load_4bit)."""
    model = build_model() if base == "bf16" else load_4bit(checkpoint)
    if setup == "frozen":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        return model
    if method_of(setup) not in DROPOUT_METHODS:
        return _peft_method_model(model, setup)
    kwargs = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules="all-linear")
    if method_of(setup) == "dora":
        kwargs["use_dora"] = True
    if setup.startswith("peft"):
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    import fastpeft

    return fastpeft.patch(model, fastpeft.LoraConfig(**kwargs))


ADALORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_method_model(model, setup: str):
    """PEFT's (IA)³ or AdaLoRA model over ``model``; patched by fastpeft for the "fastpeft-*" setups."""
    import peft

    method = method_of(setup)
    if method == "ia3":
        config = peft.IA3Config(task_type="CAUSAL_LM")  # PEFT's Llama defaults: k, v, down (feedforward)
    else:
        config = peft.AdaLoraConfig(init_r=RANK, target_r=RANK // 2, lora_alpha=2 * RANK, total_step=100_000,
                                    target_modules=ADALORA_TARGETS, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    if setup.startswith("fastpeft"):
        import fastpeft

        fastpeft.patch(peft_model)
    return peft_model


def training_case(base: str, setup: str, dropout: float | None, checkpoint: str | None = None):
    """(case, step): a dict holding the case's model, optimizer and tokens (the same tokens for every
    case), and a function running one AdamW step on them that returns the loss. Dropping the dict
    frees the case (pytest-benchmark may keep ``step`` alive; it holds only the dict)."""
    case = {"model": prepare(base, setup, dropout, checkpoint).train(), "step": 0}
    case["opt"] = torch.optim.AdamW([p for p in case["model"].parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    case["input_ids"] = torch.randint(0, SIZE["vocab"], (SIZE["batch"], SIZE["seq"]), device="cuda", generator=gen)
    adalora = method_of(setup) == "adalora"

    def step():
        loss = case["model"](input_ids=case["input_ids"], labels=case["input_ids"]).loss
        loss.backward()
        case["opt"].step()
        if adalora:  # PEFT's AdaLoRA loop: rank allocation between the optimizer step and zero_grad
            case["model"].base_model.update_and_allocate(case["step"])
        case["step"] += 1
        case["opt"].zero_grad(set_to_none=True)
        return loss

    return case, step


def _ratio(a, b):
    return a / b if a is not None and b else None


def _derive(rows: list[dict]) -> list[dict]:
    """Ratios against the frozen floor of the same base and against PEFT's row of the same base,
    method and dropout, from this run (None where either side has no number)."""
    frozen = {r.get("base", "bf16"): r for r in rows if r["setup"] == "frozen"}
    peft_rows = {(r.get("base", "bf16"), r.get("method", "lora"), r["dropout"]): r
                 for r in rows if r["setup"].startswith("peft")}
    for r in rows:
        base = r.get("base", "bf16")
        floor, ref = frozen.get(base, {}), peft_rows.get((base, r.get("method", "lora"), r["dropout"]))
        r["step_vs_frozen"] = _ratio(r.get("step_ms"), floor.get("step_ms"))
        r["peak_vs_frozen"] = _ratio(r.get("peak_gib"), floor.get("peak_gib"))
        r["step_vs_peft"] = (_ratio(r.get("step_ms"), ref.get("step_ms"))
                             if ref is not None and r["setup"] != "frozen" else None)
    return rows


RESULTS.derive(
    TABLE,
    _derive,
    note=(f"LlamaForCausalLM hidden {SIZE['hidden']}, intermediate {SIZE['intermediate']}, {SIZE['layers']} layers, "
          f"{SIZE['heads']} heads / {SIZE['kv_heads']} KV, vocab {SIZE['vocab']}, bf16, batch {SIZE['batch']} x "
          f"{SIZE['seq']} tokens, AdamW, mean of {STEPS} steps after {WARMUP} warm-up; LoRA r={RANK}, "
          f"alpha {2 * RANK}, all-linear. base nf4: the same weights loaded in 4-bit (NF4, double quantization, "
          f"bf16 compute), no prepare_model_for_kbit_training. ia3: IA3Config() (k, v, down; down feedforward). "
          f"adalora: init_r {RANK}, target_r {RANK // 2}, alpha {2 * RANK}, q k v o gate up down, "
          f"update_and_allocate every step. *_vs_* compare rows of the same base (step_vs_peft: PEFT's row of the "
          f"same method); < 1 is faster / smaller."),
)


@pytest.fixture(scope="session")
def nf4_checkpoint(gpu_name):
    """build_model()'s model (bf16, seed 0) saved once per session to a temporary folder, which the
    4-bit cases load; the folder is removed at the end of the session."""
    folder = tempfile.mkdtemp(prefix="fastpeft-e2e-")
    try:
        model = build_model()
        model.save_pretrained(folder)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("base,setup,dropout", CASES, ids=[case_id(*c) for c in CASES])
def test_train_step(base, setup, dropout, gpu_name, bench_record, benchmark, request):
    method = method_of(setup)
    if setup == "peft" or method not in (None, "lora"):
        pytest.importorskip("peft")
    checkpoint = None
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
        checkpoint = request.getfixturevalue("nf4_checkpoint")
    gc.collect()
    torch.cuda.empty_cache()
    # Everything of this case lives in `case`, cleared at the end, so the next case's peak memory
    # does not include this one's model.
    try:
        case, step = training_case(base, setup, dropout, checkpoint)
    except NotImplementedError as e:
        if not setup.startswith("fastpeft"):
            raise
        bench_record(TABLE, {"setup": setup, "method": method, "base": base, "dropout": dropout, "step_ms": None,
                             "error": f"NotImplementedError: {e}"[:120]})
        pytest.skip(f"fastpeft on the {base} base: {e}")
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
    assert torch.isfinite(loss).item(), f"{case_id(base, setup, dropout)}: non-finite loss {loss.item()}"
    tokens = SIZE["batch"] * SIZE["seq"]
    row = {"setup": setup, "method": method, "base": base, "dropout": dropout, "step_ms": step_ms, "host_ms": host_ms,
           "tokens_per_s": tokens / (step_ms / 1e3), "peak_gib": peak_gib, "trainable": trainable}
    bench_record(TABLE, row)
    # pytest-benchmark's record of the same step (a few more synchronized steps, not the table's numbers).
    register(benchmark, step, rounds=3, warmup_rounds=0, gpu=gpu_name, **row)
    case.clear()
    del loss
    gc.collect()
    torch.cuda.empty_cache()
