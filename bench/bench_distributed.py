"""bench_e2e's LoRA training step on 2 GPUs: DDP and FSDP2 (``fully_shard``) against one GPU, fastpeft
against PEFT (issue 23). Needs 2 CUDA GPUs; not yet run (no 2-GPU machine so far).

Each case is one ``torchrun --standalone --nproc-per-node N`` run of this file (N = 1 for "single"):
each rank builds bench_e2e's model (``build_model`` / ``prepare``: Llama-shaped, bf16 base, LoRA r=16
all-linear with fp32 adapters, dropout 0.05; FASTPEFT_E2E_* sizes apply), wraps it (DDP, or FSDP2 on
each decoder layer and the root), and times AdamW steps on its own batch of FASTPEFT_E2E_BATCH x _SEQ
tokens (weak scaling: 2 GPUs train twice the tokens a step). ``tokens_per_s`` counts every rank's
tokens; ``vs_single`` is that over the same implementation's 1-GPU rate (2.0 = perfect scaling),
``vs_peft`` over PEFT's rate with the same wrapping.

    pytest bench/bench_distributed.py          # the table prints at the end
    torchrun --standalone --nproc-per-node 2 bench/bench_distributed.py --wrap fsdp2 --impl fastpeft
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch

TABLE = "distributed_train_step"
WRAPS = ("single", "ddp", "fsdp2")
IMPLS = ("peft", "fastpeft")
DROPOUT = 0.05


def wrap_model(model, wrap: str, local_rank: int):
    """``model`` under DDP, or FSDP2 (each decoder layer, then the root), or as it is ("single")."""
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[local_rank])
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]:
            fully_shard(layer)
        return fully_shard(model)
    return model


def run_rank(wrap: str, impl: str, out: str | None) -> None:
    """One rank of a torchrun case: time the step, rank 0 writes the row as JSON to ``out``."""
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_e2e import SIZE, STEPS, WARMUP, prepare

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)  # bench_e2e builds on "cuda": the current device
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    model = wrap_model(prepare("bf16", impl, DROPOUT).train(), wrap, local_rank)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(rank)
    ids = torch.randint(0, SIZE["vocab"], (SIZE["batch"], SIZE["seq"]), device="cuda", generator=gen)
    torch.manual_seed(1000 + rank)  # per-rank dropout masks (README, "Multi-GPU")

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(STEPS):
        loss = step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) * 1e3 / STEPS
    times = [None] * world
    dist.all_gather_object(times, step_ms)
    step_ms = max(times)  # the slowest rank sets the pace
    if rank == 0 and out:
        row = {"wrap": wrap, "impl": impl, "gpus": world, "dropout": DROPOUT, "step_ms": step_ms,
               "tokens_per_s": world * SIZE["batch"] * SIZE["seq"] / (step_ms / 1e3),
               "peak_gib_rank0": torch.cuda.max_memory_allocated() / 2**30, "loss": loss.item()}
        with open(out, "w") as f:
            json.dump(row, f)
    dist.destroy_process_group()


# --- pytest: one torchrun per case -----------------------------------------------------------------
def _derive(rows: list[dict]) -> list[dict]:
    by = {(r["wrap"], r["impl"]): r.get("tokens_per_s") for r in rows}
    for r in rows:
        single, peft = by.get(("single", r["impl"])), by.get((r["wrap"], "peft"))
        rate = r.get("tokens_per_s")
        r["vs_single"] = rate / single if rate and single else None
        r["vs_peft"] = rate / peft if rate and peft else None
    return rows


try:
    from common import RESULTS

    RESULTS.derive(TABLE, _derive, note=f"bench_e2e's model and sizes, bf16 base, LoRA dropout {DROPOUT}, AdamW; "
                                        "weak scaling (each GPU its own batch); vs_single: over 1 GPU of the "
                                        "same impl (2.0 = perfect), vs_peft: over PEFT with the same wrapping")
except ImportError:  # run by torchrun as a script: no bench harness needed
    pass


@pytest.fixture
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("bench_distributed needs 2 CUDA GPUs")


@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_distributed_train_step(wrap, impl, two_gpus, bench_record, tmp_path):
    if impl == "peft":
        pytest.importorskip("peft")
    out = tmp_path / "row.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={1 if wrap == 'single' else 2}", os.path.abspath(__file__),
           "--wrap", wrap, "--impl", impl, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    bench_record(TABLE, json.loads(out.read_text()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wrap", choices=WRAPS, required=True)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--out", default=None, help="rank 0 writes the row here (JSON)")
    args = parser.parse_args()
    run_rank(args.wrap, args.impl, args.out)
