"""bench/plot.py draws a results JSON (needs matplotlib, the bench extra; skipped without it)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _row(M, p, **extra):
    row = {"K": 64, "N": 32, "M": M, "r": 16, "dropout": p, "fastpeft/linear_fwd": 1.1, "fastpeft/linear_fwdbwd": 1.2,
           "peft/fastpeft_fwdbwd": 2.1}
    return {**row, **extra}


def test_plot_merges_files_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    import plot

    first = {"gpu": "test GPU", "date": "2026-12-01T00:00:00",
             "tables": {"lora_linear": [_row(1, 0.0, **{"fastpeft/linear_fwd_graph": 1.3}), _row(4096, 0.0)],
                        "e2e_train_step": [{"setup": "frozen", "dropout": None, "step_vs_frozen": 1.0,
                                            "peak_vs_frozen": 1.0},
                                           {"setup": "fastpeft", "dropout": 0.05, "step_vs_frozen": 1.1,
                                            "peak_vs_frozen": 0.95}]}}
    second = {"gpu": "test GPU", "tables": {"lora_linear": [_row(4096, 0.0, **{"fastpeft/linear_fwd": 1.05})]}}
    paths = []
    for i, data in enumerate((first, second)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(data))
    tables, meta = plot.load(paths)
    assert meta["gpu"] == "test GPU"
    assert len(tables["lora_linear"]) == 2  # the second file's row replaced the first's
    assert [r["fastpeft/linear_fwd"] for r in tables["lora_linear"] if r["M"] == 4096] == [1.05]
    out = plot.plot(paths, tmp_path / "ratios.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_rows_says_so(tmp_path):
    pytest.importorskip("matplotlib")
    import plot

    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"tables": {}}))
    with pytest.raises(SystemExit, match="no lora_linear rows"):
        plot.plot([path], tmp_path / "x.png")
