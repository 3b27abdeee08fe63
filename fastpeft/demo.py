"""``fastpeft demo``: train LoRA adapters on a small Llama-shaped model, three ways, and compare.

Everything is built here, nothing is downloaded: the model is a ``LlamaForCausalLM`` made from a
``LlamaConfig`` with random frozen weights, the "tokenizer" is byte-level (token = byte value, plus
three special tokens) and the data is the short text below. The same adapters (same initial
weights, same batches) are trained with

* **fastpeft**  — ``fastpeft.patch`` with the default backend (the fused Triton kernels on CUDA;
  on CPU the default backend is the reference path, so this row *is* the reference row),
* **reference** — the same model patched with ``options=fastpeft.Options(backend="reference")`` (plain PyTorch),
* **PEFT**      — ``peft.get_peft_model`` with the same LoraConfig, when peft is installed,

and the loss curves must agree within a tolerance for the dtype. The fastpeft adapter is saved in
PEFT's format and loaded back into a fresh model (with PEFT when installed) as a last check.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

TEXT = """\
Low-rank adaptation freezes the weights of a pretrained model and learns, for each chosen linear
layer, two thin matrices whose product is added to the frozen weight. With a rank of eight or
sixteen the adapters hold a fraction of a percent of the parameters, so the optimizer state is
tiny and one base model can carry many adapters, one per task.

The arithmetic of a LoRA layer is simple: the input goes through the frozen weight, and in
parallel through the first thin matrix, the second thin matrix and a scaling factor. Done naively
that is three matrix products, a dropout that copies the input, and several passes over memory
for every layer, forward and backward. Fusing them lets the large product carry the small ones in
its epilogue, and the dropout mask is recomputed from a seed instead of being stored.

A language model learns the statistics of its text one byte at a time here: spaces follow words,
capitals follow full stops, and the letter q is nearly always followed by u. Even a model with
random frozen weights can bend its predictions toward this text when its adapters are trained,
which is what the falling loss below shows.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How
vexingly quick daft zebras jump. The five boxing wizards jump quickly. Sphinx of black quartz,
judge my vow.
"""

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259  # 256 byte values + BOS, EOS, PAD

# |loss_a - loss_b| <= atol + rtol * |loss_b|, step by step over the compared part of the curve.
TOLERANCE = {
    torch.float32: (1e-3, 1e-4),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (2e-2, 1e-2),
}
CURVE_STEPS = 5  # steps of the loss curves that are compared ("a few steps")
WARMUP_STEPS = 3  # steps left out of the median step time (Triton compiles on the first one)

# Defaults per device: small enough for well under a minute on 2 CPU cores; a meaningful size on CUDA.
DEFAULTS = {
    "cpu": dict(hidden=64, layers=2, heads=4, seq_len=64, batch=4, steps=20),
    "cuda": dict(hidden=1024, layers=4, heads=16, seq_len=512, batch=8, steps=30),
}


# Third-party messages a demo user can do nothing about, hidden while the demo runs (never globally):
# bitsandbytes logs that it could not fetch an optional CPU kernel when peft imports it, and PEFT's
# get_peft_model reads a transformers property that warns it is deprecated.
KNOWN_NOISE_LOGS = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}
KNOWN_NOISE_WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated")]


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def known_noise_hidden():
    """Hide KNOWN_NOISE_LOGS and KNOWN_NOISE_WARNINGS for the duration; everything else still shows."""
    filters = [(logging.getLogger(name), _DropMessages(prefix)) for name, prefix in KNOWN_NOISE_LOGS.items()]
    with warnings.catch_warnings():
        for category, message in KNOWN_NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger, drop in filters:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger, drop in filters:
                logger.removeFilter(drop)


def encode(text: str) -> list[int]:
    """The byte-level tokenizer: BOS, then one token per UTF-8 byte."""
    return [BOS] + list(text.encode("utf-8"))


def make_batches(steps: int, batch: int, seq_len: int, seed: int, device) -> list[torch.Tensor]:
    """``steps`` batches of random windows of the text, (batch, seq_len) each, the same for every run."""
    ids = encode(TEXT)
    while len(ids) < seq_len + 1:
        ids = ids + encode(TEXT)
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (steps, batch), generator=gen)
    windows = starts[..., None] + torch.arange(seq_len)
    return [data[w].to(device) for w in windows]


def build_model(args, device, dtype):
    """A LlamaForCausalLM from a config, weights drawn from ``args.seed`` (identical for every run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq_len, 128),
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
        use_cache=False,
        # fan-in init: unit-scale activations at any size, and logits large enough to learn from
        initializer_range=args.hidden**-0.5,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def lora_modules(model, adapter_name: str = "default") -> dict[str, nn.Module]:
    """LoRA layers (fastpeft's or PEFT's: the same attributes) by name relative to the base model."""
    out = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
            out[name.removeprefix("base_model.model.")] = module
    return out


def adapter_state(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
        for name, m in lora_modules(model).items()
    }


@torch.no_grad()
def load_adapter_state(model, state, who: str) -> None:
    """Copy the initial adapter weights into ``model``; the targeted layers must be the same ones."""
    modules = lora_modules(model)
    if modules.keys() != state.keys():
        missing, extra = sorted(state.keys() - modules.keys()), sorted(modules.keys() - state.keys())
        raise RuntimeError(
            f"{who} targets other layers than fastpeft: missing {missing[:4]}, extra {extra[:4]}"
        )
    for name, (a, b) in state.items():
        modules[name].lora_A["default"].weight.copy_(a)
        modules[name].lora_B["default"].weight.copy_(b)


@dataclass
class Run:
    label: str
    backend: str
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    peak_mib: float = float("nan")
    note: str = ""

    @property
    def step_ms(self) -> float:
        timed = self.step_s[WARMUP_STEPS:] or self.step_s
        return 1e3 * statistics.median(timed)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # Unix only; Linux reports ru_maxrss in KiB

    # The whole process's high-water mark, not this run's alone.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train(run: Run, model, batches, args, device) -> Run:
    """AdamW on the trainable parameters, one step per batch, with a progress bar showing the loss."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    bar = tqdm(batches, desc=f"{run.label:>9}", unit="step", leave=True, dynamic_ncols=True, file=sys.stderr)
    for input_ids in bar:
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # synchronizes
        run.step_s.append(time.perf_counter() - t0)
        run.losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
    bar.close()
    run.peak_mib = _peak_mib(device)
    return run


@torch.no_grad()
def eval_loss(model, input_ids) -> float:
    model.eval()
    return model(input_ids=input_ids, labels=input_ids).loss.item()


def lora_config(args):
    import fastpeft

    return fastpeft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, target_modules="all-linear"
    )


def curves_agree(a: list[float], b: list[float], dtype, steps: int) -> tuple[bool, float]:
    """(ok, max |Δ|) over the first ``steps`` steps of two loss curves."""
    atol, rtol = TOLERANCE[dtype]
    n = min(steps, len(a), len(b))
    ok = all(math.isfinite(x) and abs(x - y) <= atol + rtol * abs(y) for x, y in zip(a[:n], b[:n]))
    worst = max(abs(x - y) for x, y in zip(a[:n], b[:n]))
    return ok, worst


def _fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def run_demo(args) -> int:
    """The whole demo; returns the exit code (0: every check passed)."""
    import fastpeft
    from fastpeft.backend import use_triton

    device, dtype = args.device, args.dtype
    try:
        import peft
    except ImportError:
        peft = None
    use_peft = peft is not None and not args.no_peft

    probe = torch.empty(0, device=device)
    try:
        kernels = use_triton(probe)
    except (RuntimeError, ValueError) as err:
        print(f"fastpeft demo: error: {err}", file=sys.stderr)
        return 2
    fast_backend = "triton" + (" (interpreter)" if device.type == "cpu" else "") if kernels else "reference"

    batches = make_batches(args.steps, args.batch, args.seq_len, args.seed, device)
    tokens = args.batch * args.seq_len
    print(
        f"fastpeft demo: LlamaForCausalLM from a config (hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, {args.heads} heads, byte vocab {VOCAB_SIZE}), random frozen weights\n"
        f"  data: {len(TEXT.encode())} bytes of built-in text, batch {args.batch} x {args.seq_len} tokens, "
        f"{args.steps} steps of AdamW (lr {args.lr:g})\n"
        f"  LoRA r={args.rank}, alpha={2 * args.rank}, dropout={args.dropout:g}, target_modules=all-linear\n"
        f"  device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"dtype {str(dtype).removeprefix('torch.')}, seed {args.seed}, fastpeft backend: {fast_backend}"
    )
    why_reference = "no CUDA" if device.type == "cpu" else "FASTPEFT_BACKEND=reference"
    if not kernels and device.type == "cpu":
        print(
            "  note: the fused kernels run on CUDA tensors (or under TRITON_INTERPRET=1 with FASTPEFT_BACKEND=triton);"
            "\n        here fastpeft's default backend is the reference path, so the 'fastpeft' row is the reference"
            " run\n        and is not timed twice. CPU timings say nothing about the kernels."
        )
    elif not kernels:
        print("  note: FASTPEFT_BACKEND=reference is set, so the 'fastpeft' row is the reference run (no kernels)")

    runs: list[Run] = []
    checks: list[tuple[str, bool, str]] = []

    # 1. fastpeft with the default backend: its initial adapters become everyone's initial adapters.
    _reset_peak(device)
    model = build_model(args, device, dtype)
    model = fastpeft.patch(model, lora_config(args))
    trainable, total = fastpeft.trainable_parameters(model)
    print(f"  trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    init_state = adapter_state(model)
    if not init_state:
        print("fastpeft demo: error: fastpeft.patch wrapped no layer", file=sys.stderr)
        return 1
    fast = train(Run("fastpeft", fast_backend), model, batches, args, device)
    if not kernels:
        fast.note = f"= reference ({why_reference})"
    runs.append(fast)
    fast_eval = eval_loss(model, batches[0])
    out_dir = os.path.abspath(args.output_dir)
    fastpeft.save_adapter(model, out_dir)
    del model
    gc.collect()

    # 2. the reference path, only where it differs from the default backend.
    ref = None
    if kernels:
        _reset_peak(device)
        model = fastpeft.patch(build_model(args, device, dtype), lora_config(args),
                               options=fastpeft.Options(backend="reference"))
        load_adapter_state(model, init_state, "fastpeft (reference)")
        ref = train(Run("reference", "reference"), model, batches, args, device)
        del model
        runs.append(ref)

    # 3. PEFT, same config, same initial adapters, same batches.
    peft_run = None
    if use_peft:
        _reset_peak(device)
        model = peft.get_peft_model(
            build_model(args, device, dtype),
            peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                            target_modules="all-linear"),
        )
        load_adapter_state(model, init_state, "PEFT")
        peft_run = train(Run("PEFT", f"peft {peft.__version__}"), model, batches, args, device)
        del model
        runs.append(peft_run)
    gc.collect()

    # Results.
    header = ["run", "backend", "first loss", "last loss", "step ms (median)", "tokens/s",
              "peak MiB" + (" (allocated)" if device.type == "cuda" else " (RSS, process)"), "speed vs PEFT"]
    rows = []
    for r in runs:
        speed = f"{peft_run.step_ms / r.step_ms:.2f}x" if peft_run is not None else "-"
        rows.append([f"{r.label} {r.note}".strip(), r.backend, f"{r.losses[0]:.4f}", f"{r.losses[-1]:.4f}",
                     f"{r.step_ms:.2f}", f"{tokens / (r.step_ms / 1e3):,.0f}", f"{r.peak_mib:,.0f}", speed])
    print("\nResults (step time: median over steps " + (f"{WARMUP_STEPS + 1}-{args.steps}" if args.steps > WARMUP_STEPS
                                                      else f"1-{args.steps}") + f"; {tokens} tokens a step)")
    print(_fmt_table(header, rows))
    if device.type == "cpu":
        print("peak memory on CPU: ru_maxrss, the whole process's high-water mark after each run (it never goes down,"
              " so later rows include earlier ones)")

    # Checks.
    atol, rtol = TOLERANCE[dtype]
    went_down = fast.losses[-1] < fast.losses[0]
    checks.append(("loss goes down", went_down or args.steps < 5,
                   f"{fast.losses[0]:.4f} -> {fast.losses[-1]:.4f}"
                   + ("" if went_down or args.steps >= 5 else " (too few steps to require it)")))
    for other, what in ((ref, "reference"), (peft_run, "PEFT")):
        if other is None:
            continue
        steps = CURVE_STEPS
        if what == "PEFT" and args.dropout > 0:
            # PEFT draws torch dropout masks, fastpeft Philox masks: only the first step (lora_B = 0,
            # so dropout cannot change the loss yet) is comparable.
            steps = 1
        ok, worst = curves_agree(fast.losses, other.losses, dtype, steps)
        n = min(steps, args.steps)
        detail = f"max |dloss| {worst:.2e} (allowed {atol:g} + {rtol:g}*|loss|)"
        if n < args.steps and (what != "PEFT" or args.dropout == 0):
            whole = curves_agree(fast.losses, other.losses, dtype, args.steps)[1]
            detail += f"; over all {args.steps} steps: {whole:.2e}"
        checks.append((f"fastpeft vs {what}: loss curve, first {n} step{'s' if n > 1 else ''}", ok, detail))
    if use_peft and args.dropout > 0:
        print("note: with dropout > 0 PEFT's masks differ from fastpeft's, so only the first-step losses of PEFT are"
              " compared; run with --dropout 0 to compare the curves")

    # The saved adapter, loaded into a fresh copy of the base model.
    if use_peft:
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(build_model(args, device, dtype), out_dir)
        how = "PEFT (PeftModel.from_pretrained)"
    else:
        reloaded = fastpeft.load_adapter(build_model(args, device, dtype), out_dir)  # patches from the saved config
        how = "fastpeft (load_adapter)"
    back = eval_loss(reloaded, batches[0])
    del reloaded
    ok = abs(back - fast_eval) <= atol + rtol * abs(fast_eval)
    checks.append((f"saved adapter reloads in {how}", ok, f"eval loss {back:.4f} vs {fast_eval:.4f}"))

    print("\nChecks")
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    files = ", ".join(sorted(os.listdir(out_dir)))
    print(f"\nAdapter saved in PEFT's format to {out_dir} ({files})")
    print("  load it with: peft.PeftModel.from_pretrained(model, dir) or fastpeft.load_adapter(model, dir)")
    passed = all(ok for _, ok, _ in checks)
    print("\nPASS" if passed else "\nFAIL")
    return 0 if passed else 1
