"""One table from the bench results JSON files of an A/B run (tools/ab.sh, tools/ab_trees.sh).

    python tools/ab_table.py LABEL=FILE [LABEL=FILE ...] [--metrics REGEX]

Each file is what ``pytest bench/`` writes (bench/common.py). A label given more than once (one file
per round) is averaged over its files. Rows are matched across labels by their non-measured columns
(K, N, M, r, dropout, setup, ...); for each row and metric the table shows every label's mean and
each later label's ratio to the first. ``--metrics`` picks the columns (a regular expression; by
default fastpeft's times and ratios, F.linear's forward as the control, the step and its peak
memory). Standard library only.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

DEFAULT_METRICS = r"^(fastpeft[_/].*|linear_fwd_ms|step_ms|peak_gib)$"
KEY_FLOATS = {"dropout"}  # float columns that identify a row rather than measure it
NOT_KEY = {"trainable"}  # neither a row's identity nor a timing


def _is_metric(column: str, value) -> bool:
    return isinstance(value, float) and column not in KEY_FLOATS


def _row_key(table: str, row: dict) -> tuple:
    return (table,) + tuple((c, v) for c, v in row.items() if not _is_metric(c, v) and c not in NOT_KEY)


def collect(pairs: list[tuple[str, Path]], metrics: str) -> tuple[list[str], dict]:
    """(labels in first-seen order, {row key: {metric: {label: [values]}}})."""
    labels: list[str] = []
    rows: dict = {}
    pattern = re.compile(metrics)
    for label, path in pairs:
        if label not in labels:
            labels.append(label)
        data = json.loads(Path(path).read_text())
        for table, table_rows in data.get("tables", {}).items():
            for row in table_rows:
                cells = rows.setdefault(_row_key(table, row), {})
                for column, value in row.items():
                    if _is_metric(column, value) and pattern.search(column) and math.isfinite(value):
                        cells.setdefault(column, {}).setdefault(label, []).append(value)
    return labels, rows


def _describe(key: tuple) -> str:
    table, *cols = key
    return table + " " + " ".join(f"{c}={v}" for c, v in cols if v is not None)


def format_table(labels: list[str], rows: dict) -> str:
    head = ["row", "metric", *labels, *(f"{b} / {labels[0]}" for b in labels[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, cells in rows.items():
        for metric, by_label in cells.items():
            means = [sum(v) / len(v) if v else None for v in (by_label.get(label, []) for label in labels)]
            ratios = [f"{m / means[0]:.3f}" if m is not None and means[0] else "-" for m in means[1:]]
            shown = [f"{m:.4g}" if m is not None else "-" for m in means]
            lines.append("| " + " | ".join([_describe(key), metric, *shown, *ratios]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="LABEL=FILE")
    parser.add_argument("--metrics", default=DEFAULT_METRICS)
    args = parser.parse_args(argv)
    pairs = []
    for item in args.files:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            parser.error(f"expected LABEL=FILE, got {item!r}")
        pairs.append((label, Path(path)))
    labels, rows = collect(pairs, args.metrics)
    if not rows:
        raise SystemExit("no rows in " + ", ".join(str(p) for _, p in pairs))
    print(format_table(labels, rows))


if __name__ == "__main__":
    main()
