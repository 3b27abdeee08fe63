"""The 4-bit base product of QLoRA: fastpeft's nf4_matmul against bitsandbytes and F.linear (cuBLAS).

out = x · dequant(Wq)ᵀ for bf16 x (M, K) and W (N, K) = randn / √K quantized by bitsandbytes'
``quantize_4bit`` (NF4, blocksize 64, double quantization), so both 4-bit products read the same
bytes. Three columns per row, timed in the same run in A B C C B A order (common.time_ms, the
median of do_bench): ``fastpeft_ms`` (``qlora.matmul_4bit``: nf4_matmul on the packed bytes and the nested
statistics, or dequantize + cuBLAS above FUSED_MAX_M rows, as a QLoRA layer runs it),
``bnb_ms`` (``bitsandbytes.matmul_4bit`` called as ``bnb.nn.Linear4bit.forward`` calls it: its own
gemv at decode sizes, its own choice of kernel or dequantize + cuBLAS above) and ``linear_ms``
(``F.linear`` on the bf16 W, the floor where the product is compute-bound). At M <= 64 the product
is a read of the weight: ``*_gbps`` is the packed weight's N·K/2 bytes over the time, and
``pct_copy`` fastpeft's GB/s as a percentage of the device's copy bandwidth (bytes read + written
by ``dst.copy_(src)`` of 1 GiB, measured once per session, table ``device_copy``). ``rel_diff`` is
max |fastpeft - bnb| / max |bnb| of one call (both dequantize the same bytes); a row over
MAX_REL_DIFF is recorded, then fails. Shapes are freed between rows of different (K, N).

    pytest bench/bench_nf4.py -s          # the grid below (GPU only; 1-2 minutes on an H100)
    python bench/bench_nf4.py --quick     # 4096 x 4096 over every M, printed, for development
"""
from __future__ import annotations

import gc
import itertools
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, format_table, gbps, register, time_ms  # noqa: E402

TABLE = "nf4_matmul"
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
MS = [1, 4, 16, 64, 256, 4096, 16384]
BLOCKSIZE = 64
BANDWIDTH_MAX_M = 64  # up to here the product reads the weight: the GB/s columns
MEMORY_LIMIT_BYTES = 40e9  # a (K, N, M) whose tensors would pass this is skipped
COPY_BYTES = 2**30  # the copy that measures the device's bandwidth: 1 GiB, read and written
MAX_REL_DIFF = 0.05  # fastpeft against bnb on the same bytes; far above bf16 rounding, far below a bug

NOTE = ("bf16 x (M, K), W (N, K) NF4 blocksize 64 with double quantization; *_gbps: packed weight bytes "
        "(N·K/2) / time; pct_copy: fastpeft_gbps / the device's copy GB/s (table device_copy); "
        "fastpeft/linear < 1 and bnb/fastpeft > 1: fastpeft is faster.")
RESULTS.notes[TABLE] = NOTE


def memory_bytes(K: int, N: int, M: int) -> int:
    """An upper estimate of what one row holds on the GPU at once: W in bf16, its packed bytes, a
    dequantized copy (bnb's larger-M route), x, two outputs (do_bench frees each after the next
    call) and do_bench's 256 MB L2 flush buffer."""
    return 2 * N * K + N * K // 2 + 2 * N * K + 2 * M * K + 2 * (2 * M * N) + 256 * 2**20


def grid():
    """(K, N, M) of every row, less those over MEMORY_LIMIT_BYTES."""
    for (K, N), M in itertools.product(SHAPES, MS):
        if memory_bytes(K, N, M) <= MEMORY_LIMIT_BYTES:
            yield K, N, M


def derive_row(row: dict, copy_gbps: float | None) -> dict:
    """The ratio and bandwidth columns of a row from its ``*_ms`` columns (in place; also returned)."""
    K, N, M = row["K"], row["N"], row["M"]
    fast, bnb_ms, linear = row["fastpeft_ms"], row["bnb_ms"], row["linear_ms"]
    row["fastpeft/linear"] = fast / linear
    row["bnb/fastpeft"] = bnb_ms / fast
    if M <= BANDWIDTH_MAX_M:
        weight_bytes = N * K // 2
        row["fastpeft_gbps"] = gbps(weight_bytes, fast)
        row["bnb_gbps"] = gbps(weight_bytes, bnb_ms)
        row["pct_copy"] = 100 * row["fastpeft_gbps"] / copy_gbps if copy_gbps else None
    return row


def measure_copy_gbps() -> dict:
    """The device's copy bandwidth: ``dst.copy_(src)`` of COPY_BYTES of bf16, (bytes read + bytes
    written) / the median time."""
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": COPY_BYTES, "copy_ms": ms, "copy_gbps": gbps(2 * COPY_BYTES, ms)}


class Weights:
    """W (N, K) bf16 and its bitsandbytes NF4 quantization, for one shape at a time: asking for
    another shape frees the previous one first (8192 x 28672 is 470 MB in bf16)."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, K: int, N: int):
        """(W, packed, state, nested): nested is the ``nested=`` argument of nf4_matmul."""
        if self.key != (K, N):
            self.clear()
            import bitsandbytes.functional as bnbF

            torch.manual_seed(0)
            W = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / math.sqrt(K)
            packed, state = bnbF.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
            nested = (state.state2.code, state.state2.absmax, state.state2.blocksize, float(state.offset))
            self.key, self.value = (K, N), (W, packed, state, nested)
        return self.value

    def clear(self):
        self.key = self.value = None
        gc.collect()
        torch.cuda.empty_cache()


WEIGHTS = Weights()


def nf4_product(packed, state, N: int, K: int, nested):
    """fastpeft's 4-bit base product as ``f(x)`` (``qlora.matmul_4bit``: the kernels by rows, as a QLoRA
    layer runs them), the weight built once here so the timed call does not rebuild it."""
    from fastpeft import qlora
    from fastpeft.kernels import nf4

    w = nf4.packed_4bit(packed, state.absmax, state.code, N, K, BLOCKSIZE, nested=nested)
    return lambda x: qlora.matmul_4bit(x, w)


def products(K: int, N: int, M: int):
    """(held, {name: the product as a callable}) for one row: fastpeft, bnb, linear on the same W.
    The callables read their tensors from ``held``: clearing it frees them even where
    pytest-benchmark keeps a callable."""
    import bitsandbytes as bnb

    W, packed, state, nested = WEIGHTS.get(K, N)
    held = {"x": torch.randn(M, K, dtype=torch.bfloat16, device="cuda"), "W": W, "packed": packed, "state": state,
            "fastpeft": nf4_product(packed, state, N, K, nested)}
    calls = {
        "fastpeft": lambda: held["fastpeft"](held["x"]),
        # bnb.nn.Linear4bit.forward's call. Older bitsandbytes passes the weight transposed
        # (``self.weight.t()``); 0.50 passes it as is and takes either (matmul_4bit views it as (n, 1)).
        "bnb": lambda: bnb.matmul_4bit(held["x"], held["packed"].t(), quant_state=held["state"]),
        "linear": lambda: F.linear(held["x"], held["W"]),
    }
    return held, calls


def measure(K: int, N: int, M: int, copy_gbps: float | None) -> tuple[dict, dict, callable]:
    """(row, held, fastpeft's callable) of one (K, N, M); ``held.clear()`` lets its tensors go."""
    from fastpeft.kernels.nf4 import GEMV_MAX_M

    held, calls = products(K, N, M)
    fast, ref = calls["fastpeft"](), calls["bnb"]()
    assert torch.isfinite(fast).all().item(), f"nf4_matmul K={K} N={N} M={M}: non-finite output"
    rel_diff = ((fast.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    del fast, ref
    # Two passes, the second in reverse (A B C C B A), each cell their mean: the GPU's clock drifts
    # over a run (docs/performance.md, Method).
    order = list(calls)
    times: dict[str, list[float]] = {}
    for name in order + order[::-1]:
        times.setdefault(name, []).append(time_ms(calls[name]))
    row = {"K": K, "N": N, "M": M, "path": "gemv" if M <= GEMV_MAX_M else "tiled"}
    for name in ("linear", "fastpeft", "bnb"):
        row[f"{name}_ms"] = sum(times[name]) / len(times[name])
    derive_row(row, copy_gbps)
    row["rel_diff"] = rel_diff
    return row, held, calls["fastpeft"]


@pytest.fixture(scope="session")
def copy_gbps(gpu_name) -> float:
    """The device's copy bandwidth (GB/s), measured once per session; its row goes to ``device_copy``."""
    row = measure_copy_gbps()
    RESULTS.add("device_copy", row)
    RESULTS.notes[TABLE] = NOTE + f" Copy bandwidth of this run: {row['copy_gbps']:,.0f} GB/s."
    return row["copy_gbps"]


@pytest.fixture(scope="module", autouse=True)
def _free_weights():
    """Frees the last shape's weights when this file's benches are done."""
    yield
    WEIGHTS.clear()


@pytest.mark.parametrize("K,N,M", list(grid()), ids=[f"K{K}-N{N}-M{M}" for K, N, M in grid()])
def test_nf4_matmul(K, N, M, copy_gbps, bench_record, benchmark):
    row, held, fast = measure(K, N, M, copy_gbps)
    bench_record(TABLE, row)
    register(benchmark, fast, **row)
    held.clear()
    assert row["rel_diff"] < MAX_REL_DIFF, f"max |fastpeft - bnb| / max |bnb| = {row['rel_diff']:.3g}"


if __name__ == "__main__":
    if "--quick" in sys.argv:
        copy = measure_copy_gbps()
        print(f"copy: {copy['copy_gbps']:,.0f} GB/s ({torch.cuda.get_device_name()})", flush=True)
        rows = []
        for M in MS:
            rows.append(measure(4096, 4096, M, copy["copy_gbps"])[0])
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        print(format_table(rows))
