"""Shared bench helpers: the timer, the pytest-benchmark hand-off, and the results collector.

Every bench measures with :func:`time_ms` (the median of ``triton.testing.do_bench``; the method is
in docs/performance.md), adds its row to a named table with the ``bench_record`` fixture
(bench/conftest.py), and may also hand a callable to pytest-benchmark with :func:`register` so that
``pytest bench/`` is an ordinary pytest-benchmark run. At the end of the session conftest prints
every table and writes them, with the GPU name and versions, as JSON under ``bench-results/``
(``FASTPEFT_BENCH_OUT`` names another folder, or a file when it ends in ``.json``).

Nothing here touches the GPU at import time.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Callable

# Measured ceilings on the H100 (docs/performance.md, Ceilings): the roofline, not datasheet numbers.
H100_BF16_TFLOPS = 794.0
H100_COPY_GBPS = 3023.0  # bytes read + written per second, in GB/s


def time_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (flushes L2 between calls)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_time_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn`` captured once in a CUDA graph and replayed: the GPU time alone,
    without the host's launch overhead (what a serving loop under CUDA graphs pays)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, warmup_ms, rep_ms)


def chain_us(fn: Callable[[int], object], layers: int) -> float:
    """µs per layer of ``fn(0)`` ... ``fn(layers - 1)`` captured in one CUDA graph and replayed (a model's
    layers in sequence: no graph launch per layer, each layer's own weights read from memory)."""
    return graph_time_ms(lambda: [fn(i) for i in range(layers)]) * 1e3 / layers


def synchronized(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` followed by a CUDA synchronize, so wall-clock timers (pytest-benchmark) see the GPU work."""
    import torch

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def register(benchmark, fn: Callable[[], object], rounds: int = 5, iterations: int = 1, warmup_rounds: int = 1,
             **extra_info) -> None:
    """Hand ``fn`` to pytest-benchmark's ``benchmark`` fixture (a few synchronized rounds) and attach
    ``extra_info`` (the do_bench numbers of the row) to its record. Call it once per test."""
    benchmark.extra_info.update({k: _jsonable(v) for k, v in extra_info.items()})
    benchmark.pedantic(synchronized(fn), rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def gpu_name() -> str | None:
    """The CUDA device's name, or None without one (safe to call anywhere: it never raises)."""
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover - a broken driver is reported as "no GPU"
        return None


class BenchResults:
    """Tables of rows (dicts), filled by the benches, printed and written at the end of the session.

    A bench file may register a ``derive(rows) -> rows`` function per table for columns that need
    other rows (ratios against a baseline measured in another test of the same run).
    """

    def __init__(self):
        self.tables: dict[str, list[dict]] = {}
        self.derivers: dict[str, Callable[[list[dict]], list[dict]]] = {}
        self.notes: dict[str, str] = {}

    def add(self, table: str, row: dict) -> None:
        self.tables.setdefault(table, []).append(dict(row))

    def derive(self, table: str, fn: Callable[[list[dict]], list[dict]], note: str = "") -> None:
        self.derivers[table] = fn
        if note:
            self.notes[table] = note

    def final(self) -> dict[str, list[dict]]:
        out = {}
        for name, rows in self.tables.items():
            fn = self.derivers.get(name)
            out[name] = fn([dict(r) for r in rows]) if fn else rows
        return out

    def format(self, gpu: str | None = None) -> str:
        parts = []
        for name, rows in self.final().items():
            title = f"## {name}" + (f" ({gpu})" if gpu else "")
            parts.append(title + ("\n" + self.notes[name] if name in self.notes else "") + "\n" + format_table(rows))
        return "\n\n".join(parts)

    def write_json(self, path: Path, meta: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**meta, "tables": {k: [{c: _jsonable(v) for c, v in r.items()} for r in rows]
                                   for k, rows in self.final().items()}}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path


RESULTS = BenchResults()


def results_path(gpu: str | None) -> Path:
    """``$FASTPEFT_BENCH_OUT`` (a folder, or a file ending in .json), default ``bench-results/``."""
    target = Path(os.environ.get("FASTPEFT_BENCH_OUT", "bench-results"))
    if target.suffix == ".json":
        return target
    slug = "".join(c if c.isalnum() else "-" for c in (gpu or "cpu")).strip("-").lower()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return target / f"bench-{slug}-{stamp}.json"


def format_table(rows: list[dict]) -> str:
    """A Markdown table over the union of the rows' keys (first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if column.endswith("_ms"):
            return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.2f}"
    return str(value)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
