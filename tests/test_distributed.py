"""fastpeft's LoRA layers under torch.distributed, unchanged: DDP and FSDP2 (``fully_shard``) on CPU.

Two processes (gloo, ``file://`` rendezvous) run every scenario once, in one spawn (a module fixture,
about 10 s on 2 CPU cores); each writes what it saw to a file, and the tests compare it with a single
process over the whole global batch. The reference backend throughout (the kernels need CUDA; the
fused MLP and q/k/v group ops run only with the kernels, so these runs take the per-layer path).

Every model: tests/tiny_models' Llama (fp32), LoRA r=4 on all linear layers, lora_B randomized (so
every adapter gradient is non-zero), a global batch of 4 sequences, each rank a half. Tolerance
(fp32): rtol 1e-5, atol 1e-6 on losses, gradients and updated parameters (DDP's all-reduce and FSDP2's
reduce-scatter average two half-batch gradients where the single process sums one batch: rounding
order only).
"""
from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist

import fastpeft
from fastpeft.peft_format import peft_state_dict
from lora_helpers import randomize_lora_b
from tiny_models import VOCAB, make_model

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not built into this torch")

WORLD = 2
SEED = 1234
LR = 1e-2
RTOL, ATOL = 1e-5, 1e-6
REFERENCE = fastpeft.Options(backend="reference")


def global_batch() -> torch.Tensor:
    """(4, 8) token ids; rank r trains on rows 2r, 2r + 1."""
    return torch.randint(2, VOCAB, (2 * WORLD, 8), generator=torch.Generator().manual_seed(7))


def half(ids: torch.Tensor, rank: int) -> torch.Tensor:
    per_rank = ids.shape[0] // WORLD
    return ids[rank * per_rank:(rank + 1) * per_rank]


def build(dropout: float = 0.0, lora_b_seed: int = 3, dtype=torch.float32):
    """The tiny Llama with a fastpeft LoRA adapter (reference backend), in training mode; a bf16 base
    gets fp32 adapters (as PEFT's autocast_adapter_dtype)."""
    model = fastpeft.patch(make_model("llama", dtype=dtype), fastpeft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"), options=REFERENCE)
    randomize_lora_b(model, lora_b_seed)
    return model.train()


def full(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the full tensor of a DTensor (gathered: a collective)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def lora_params(model) -> dict:
    """{PEFT key: full tensor} of the adapter (DTensors gathered: a collective under FSDP2)."""
    return {key: full(t.detach()).clone() for key, t in peft_state_dict(model).items()}


def lora_grads(model) -> dict:
    """{PEFT key: full gradient} of the adapter."""
    return {key: full(t.grad).clone() for key, t in peft_state_dict(model).items()}


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


# --- what each rank runs ------------------------------------------------------------------------
def _mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x.item() / dist.get_world_size()


def scenario_ddp(rank: int, tmp: str) -> dict:
    """One SGD step under DDP, each rank a half of the batch; then rank 0 saves the adapter."""
    from torch.nn.parallel import DistributedDataParallel

    model = build()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=LR)
    loss = loss_of(ddp, half(global_batch(), rank))
    loss.backward()
    grads = lora_grads(model)
    opt.step()
    if rank == 0:
        fastpeft.save_adapter(ddp, os.path.join(tmp, "ddp-adapter"))  # the wrapper is unwrapped
    dist.barrier()
    return {"loss": _mean_over_ranks(loss), "grads": grads, "params": lora_params(model)}


def scenario_ddp_dropout(rank: int, tmp: str) -> dict:
    """Dropout 0.1 under DDP: masks from each process's torch RNG (``torch.manual_seed(SEED + rank)``)."""
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for run in ("first", "again"):  # the same step twice from the same seed
        ddp = DistributedDataParallel(build(dropout=0.1))
        torch.manual_seed(SEED + rank)
        loss_of(ddp, half(global_batch(), rank)).backward()
        out[run] = lora_grads(ddp.module)
    with torch.no_grad():  # the same rows on both ranks, dropout on: do the ranks draw different masks?
        ids = half(global_batch(), 0)
        torch.manual_seed(SEED + rank)
        out["logits_seed_plus_rank"] = ddp(input_ids=ids).logits
        torch.manual_seed(SEED)
        out["logits_same_seed"] = ddp(input_ids=ids).logits
    return out


def shard(model):
    """FSDP2: each decoder layer, then the root (the embeddings, final norm and lm_head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def scenario_fsdp2_bf16(rank: int, tmp: str) -> dict:
    """A frozen bf16 base with fp32 adapters under FSDP2 (mixed dtypes in one shard group; no
    MixedPrecisionPolicy: the base is bf16 already)."""
    model = shard(build(dtype=torch.bfloat16))
    loss = loss_of(model, half(global_batch(), rank))
    loss.backward()
    return {"loss": _mean_over_ranks(loss), "grads": lora_grads(model)}


def scenario_fsdp2(rank: int, tmp: str) -> dict:
    """One AdamW step under FSDP2 (each decoder layer and the root sharded), then save and load."""
    from torch.distributed.tensor import DTensor

    model = shard(build())
    sharded = [k for k, t in peft_state_dict(model).items() if not isinstance(t, DTensor)]
    assert not sharded, f"after fully_shard every adapter tensor should be a DTensor, these are not: {sharded[:3]}"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    loss = loss_of(model, half(global_batch(), rank))
    loss.backward()
    out = {"loss": _mean_over_ranks(loss), "grads": lora_grads(model)}
    opt.step()
    opt.zero_grad()
    out["params"] = lora_params(model)
    fastpeft.save_adapter(model, os.path.join(tmp, "fsdp2-adapter"))  # every rank; rank 0 writes

    other = shard(build(lora_b_seed=11))  # different adapter values, sharded the same way
    fastpeft.load_adapter(other, os.path.join(tmp, "fsdp2-adapter"), is_trainable=True)
    out["loaded_local"] = {k: t.detach().to_local().clone() for k, t in peft_state_dict(other).items()}
    out["loaded_trainable"] = all(t.requires_grad for t in peft_state_dict(other).values())
    try:
        fastpeft.load_adapter(other, os.path.join(tmp, "fsdp2-adapter"), adapter_name="second")
    except ValueError as exc:
        out["new_adapter_error"] = str(exc)
    with torch.no_grad():
        out["loaded_loss"] = _mean_over_ranks(loss_of(other, half(global_batch(), rank)))
    return out


SCENARIOS = {"ddp": scenario_ddp, "ddp_dropout": scenario_ddp_dropout, "fsdp2": scenario_fsdp2,
             "fsdp2_bf16": scenario_fsdp2_bf16}


def _worker(rank: int, tmp: str) -> None:
    """One rank: every scenario, each result (or its traceback) saved as ``<scenario>-<rank>.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    fastpeft.set_options(backend="reference")
    try:
        for name, scenario in SCENARIOS.items():
            try:
                result = scenario(rank, tmp)
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(tmp, f"{name}-{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{scenario: [rank 0's result, rank 1's]} from one 2-process gloo run."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    tmp = str(tmp_path_factory.mktemp("distributed"))
    crash = None
    try:
        mp.start_processes(_worker, args=(tmp,), nprocs=WORLD, start_method="spawn")
    except ProcessException as exc:  # a failed scenario can leave the ranks out of step: keep what was saved
        crash = {"error": f"a rank stopped before saving this result:\n{exc}"}

    def load(path):
        return torch.load(path, weights_only=False) if os.path.exists(path) or crash is None else crash

    results = {name: [load(os.path.join(tmp, f"{name}-{r}.pt")) for r in range(WORLD)] for name in SCENARIOS}
    results["tmp"] = tmp
    return results


def results_of(ranks, name: str) -> list:
    """Each rank's result of scenario ``name``; a scenario that raised fails with its traceback."""
    for r, result in enumerate(ranks[name]):
        assert "error" not in result, f"scenario {name} failed on rank {r}:\n{result['error']}"
    return ranks[name]


def assert_tensors_close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:4]}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {k}: {m}")


# --- the single process over the whole global batch, and the comparisons -------------------------
def single_process_step(optimizer):
    """(model after one step, loss, adapter grads) of one process over the whole global batch."""
    model = build()
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=LR)
    loss = loss_of(model, global_batch())
    loss.backward()
    grads = lora_grads(model)
    opt.step()
    return model, loss.item(), grads


def read_adapter(directory: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def test_ddp_step_matches_single_process(ranks, tmp_path):
    model, loss, grads = single_process_step(torch.optim.SGD)
    for r, result in enumerate(results_of(ranks, "ddp")):
        assert abs(result["loss"] - loss) <= ATOL + RTOL * abs(loss), f"rank {r}: DDP loss {result['loss']} vs {loss}"
        assert_tensors_close(result["grads"], grads, f"rank {r} DDP grad")
        assert_tensors_close(result["params"], lora_params(model), f"rank {r} DDP param after SGD")
    fastpeft.save_adapter(model, str(tmp_path))
    assert_tensors_close(read_adapter(os.path.join(ranks["tmp"], "ddp-adapter")), read_adapter(str(tmp_path)),
                         "DDP adapter file")


def test_ddp_dropout_masks_per_rank_and_reproducible(ranks):
    r0, r1 = results_of(ranks, "ddp_dropout")
    for r, result in enumerate((r0, r1)):  # the same seed gives the same masks: bit-for-bit the same step
        for k in result["first"]:
            assert torch.equal(result["first"][k], result["again"][k]), f"rank {r}: {k} differs between two runs"
    # torch.manual_seed(SEED + rank): each rank its own masks; one seed on every rank: the same masks
    assert not torch.equal(r0["logits_seed_plus_rank"], r1["logits_seed_plus_rank"])
    assert torch.equal(r0["logits_same_seed"], r1["logits_same_seed"])
    # DDP's averaged gradients = the mean of each half's gradients in one process, with that rank's seed
    model = build(dropout=0.1)
    for r in range(WORLD):
        torch.manual_seed(SEED + r)
        (loss_of(model, half(global_batch(), r)) / WORLD).backward()
    assert_tensors_close(r0["first"], lora_grads(model), "DDP dropout grad")


def test_fsdp2_step_matches_single_process(ranks):
    model, loss, grads = single_process_step(torch.optim.AdamW)
    params = lora_params(model)
    for r, result in enumerate(results_of(ranks, "fsdp2")):
        assert abs(result["loss"] - loss) <= ATOL + RTOL * abs(loss), f"rank {r}: FSDP2 loss {result['loss']} vs {loss}"
        assert_tensors_close(result["grads"], grads, f"rank {r} FSDP2 grad")
        assert_tensors_close(result["params"], params, f"rank {r} FSDP2 param after AdamW")


def test_fsdp2_bf16_base_matches_single_process(ranks):
    """bf16 base: the halves' bf16 products may round differently from the whole batch's, so the bound
    is bf16's (rtol 1e-2, atol 1e-4), not fp32's."""
    model = build(dtype=torch.bfloat16)
    loss = loss_of(model, global_batch())
    loss.backward()
    grads = lora_grads(model)
    for r, result in enumerate(results_of(ranks, "fsdp2_bf16")):
        assert abs(result["loss"] - loss.item()) <= 1e-2 * abs(loss.item()), f"rank {r}: {result['loss']} vs {loss.item()}"
        for k, g in grads.items():
            assert result["grads"][k].dtype == torch.float32, f"rank {r}: {k} grad is {result['grads'][k].dtype}"
            torch.testing.assert_close(result["grads"][k], g, rtol=1e-2, atol=1e-4, msg=lambda m: f"rank {r} {k}: {m}")


def test_fsdp2_save_writes_full_tensors(ranks, tmp_path):
    results_of(ranks, "fsdp2")
    model, _, _ = single_process_step(torch.optim.AdamW)
    fastpeft.save_adapter(model, str(tmp_path))
    got, want = read_adapter(os.path.join(ranks["tmp"], "fsdp2-adapter")), read_adapter(str(tmp_path))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert_tensors_close(got, want, "FSDP2 adapter file")
    with open(os.path.join(ranks["tmp"], "fsdp2-adapter", "adapter_config.json")) as f:
        saved = f.read()
    with open(os.path.join(str(tmp_path), "adapter_config.json")) as f:
        assert saved == f.read()


def test_fsdp2_load_fills_each_rank_shard(ranks):
    full = read_adapter(os.path.join(ranks["tmp"], "fsdp2-adapter"))
    for r, result in enumerate(results_of(ranks, "fsdp2")):
        assert result["loaded_trainable"]
        for k, local in result["loaded_local"].items():  # FSDP2 shards dim 0 as torch.chunk does
            assert torch.equal(local, full[k].chunk(WORLD, dim=0)[r]), f"rank {r}: shard of {k}"
        assert "DTensor" in result["new_adapter_error"] and "before wrapping or sharding" in result["new_adapter_error"]
    model = build(lora_b_seed=11)
    fastpeft.load_adapter(model, os.path.join(ranks["tmp"], "fsdp2-adapter"), is_trainable=True)
    loss = loss_of(model, global_batch()).item()
    for r, result in enumerate(results_of(ranks, "fsdp2")):
        assert abs(result["loaded_loss"] - loss) <= ATOL + RTOL * abs(loss), f"rank {r}: {result['loaded_loss']} vs {loss}"
