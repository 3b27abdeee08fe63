"""pytest harness for bench/ (GPU only): ``pytest bench/`` times every bench file, prints one table
per bench at the end of the run, and writes them as JSON (bench/common.py says where).

Without a CUDA device every bench is skipped (exit 0): the check happens when the items are
collected, never at import time, so collection itself works anywhere.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # `import common` from the bench files, whatever the import mode
    sys.path.insert(0, str(_HERE))

import common  # noqa: E402

try:  # pytest-benchmark is a test/bench dependency; without it a stand-in keeps the benches running
    import pytest_benchmark  # noqa: F401
except ImportError:  # pragma: no cover
    class _BenchmarkStandIn:
        def __init__(self):
            self.extra_info: dict = {}

        def pedantic(self, fn, args=(), kwargs=None, rounds=1, iterations=1, warmup_rounds=0, setup=None):
            return fn(*args, **(kwargs or {}))

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

    @pytest.fixture
    def benchmark():
        return _BenchmarkStandIn()


_NO_GPU = "bench/ needs a CUDA device (timings of the Triton interpreter or the CPU mean nothing)"


def _in_bench(item) -> bool:
    return _HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=_NO_GPU)
    for item in items:
        if _in_bench(item):
            item.add_marker(skip)


def pytest_report_header(config):
    name = common.gpu_name()
    return f"fastpeft bench: {name}" if name else f"fastpeft bench: no CUDA device, {_NO_GPU}"


@pytest.fixture(scope="session")
def gpu_name() -> str:
    name = common.gpu_name()
    if name is None:
        pytest.skip(_NO_GPU)
    return name


@pytest.fixture
def bench_record():
    """``bench_record(table, row)``: add a row (a dict) to a results table printed at the end; each
    row is also printed at once (with -s), so a run that is cut off still shows what it measured."""
    def record(table: str, row: dict) -> None:
        common.RESULTS.add(table, row)
        print(f"\n[{table}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items()), flush=True)

    return record


def _meta() -> dict:
    import datetime

    meta = {"gpu": common.gpu_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "peft", "bitsandbytes", "fastpeft"):
        try:
            from importlib.metadata import version

            meta[dist] = version(dist)
        except Exception:
            meta[dist] = None
    try:
        import torch

        meta["cuda"] = torch.version.cuda
    except Exception:  # pragma: no cover
        pass
    meta["env"] = {k: v for k, v in os.environ.items() if k.startswith(("FASTPEFT_", "TRITON_"))}
    return meta


_written: list[Path] = []


def pytest_sessionfinish(session, exitstatus):
    # Runs before the terminal summary below (the terminal reporter prints its summary after every
    # pytest_sessionfinish implementation has run).
    if common.RESULTS.tables:
        _written.append(common.RESULTS.write_json(common.results_path(common.gpu_name()), _meta()))


def pytest_terminal_summary(terminalreporter):
    if not common.RESULTS.tables:
        return
    terminalreporter.section("fastpeft bench results")
    for line in common.RESULTS.format(common.gpu_name()).splitlines():
        terminalreporter.write_line(line)
    for path in _written:
        terminalreporter.write_line(f"\nwritten to {path}")
