"""Plot the ratios of bench results JSON files (what ``pytest bench/`` writes; bench/results/ keeps them).

    python bench/plot.py bench/results/A.json [B.json ...] [-o ratios.png]

Rows of several files are merged (a grid run and a rerun of some rows, say; a later file's row
replaces an earlier one with the same K, N, M, r and dropout).

* ``lora_linear`` (r = 16 by default, ``--rank``): one column per (K, N) shape, against M (log scale):
  fastpeft / F.linear forward, the same for forward+backward, PEFT / fastpeft forward+backward; solid
  lines eager, dotted the CUDA-graph replay where it was measured (M <= 256), one colour per dropout;
  issue 3's targets drawn as grey segments over the M they apply to.
* ``e2e_train_step``: the step time and the peak memory of each setup against the frozen base's, as bars.

Needs matplotlib (``pip install -e .[bench]``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# issue 3's targets: (metric, M range, bound)
TARGETS = [
    ("fastpeft/linear_fwd", (4096, None), 1.10),
    ("fastpeft/linear_fwd", (None, 256), 1.30),
    ("fastpeft/linear_fwdbwd", (4096, None), 1.15),
    ("peft/fastpeft_fwdbwd", (4096, None), 2.0),
    ("peft/fastpeft_fwdbwd", (None, 256), 3.0),
]
PANELS = [("fastpeft/linear_fwd", "forward / F.linear"), ("fastpeft/linear_fwdbwd", "fwd+bwd / floor"),
          ("peft/fastpeft_fwdbwd", "PEFT / fastpeft, fwd+bwd")]
E2E_TARGETS = {"step_vs_frozen": (1.12, 1.15), "peak_vs_frozen": (1.05,)}


def load(paths) -> tuple[dict, dict]:
    """(tables merged over the files, the first file's metadata)."""
    tables: dict = {}
    meta: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = meta or {k: v for k, v in data.items() if k != "tables"}
        for name, rows in data.get("tables", {}).items():
            merged = tables.setdefault(name, {})
            for row in rows:
                key = tuple(row.get(c) for c in ("K", "N", "M", "r", "dropout", "setup"))
                merged[key] = row
    return {name: list(rows.values()) for name, rows in tables.items()}, meta


def plot_lora(axes, rows: list, rank: int) -> None:
    """One column of panels (one per PANELS row of ``axes``) per (K, N) shape."""
    shapes = sorted({(r["K"], r["N"]) for r in rows if r["r"] == rank})
    for col, (K, N) in enumerate(shapes):
        mine = [r for r in rows if (r["K"], r["N"], r["r"]) == (K, N, rank)]
        for ax, (metric, label) in zip(axes[:, col], PANELS):
            for p, colour in zip(sorted({r["dropout"] for r in mine}), ("tab:blue", "tab:orange", "tab:green")):
                line = sorted((r for r in mine if r["dropout"] == p), key=lambda r: r["M"])
                for suffix, style in (("", "-"), ("_graph", ":")):
                    pts = [(r["M"], r[metric + suffix]) for r in line if r.get(metric + suffix) is not None]
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", color=colour,
                                label=f"p={p:g}{' graph' if suffix else ''}")
            Ms = sorted({r["M"] for r in mine})
            for name, (lo, hi), bound in TARGETS:
                span = [m for m in Ms if (lo is None or m >= lo) and (hi is None or m <= hi)]
                if name == metric and span:
                    ax.plot([span[0], span[-1]], [bound, bound], "--", color="grey", linewidth=1)
            ax.set_xscale("log")
            ax.axhline(1.0, color="black", linewidth=0.5)
            ax.set_title(f"{K}x{N}, r={rank}: {label}", fontsize=9)
            ax.set_xlabel("M (tokens)", fontsize=8)
            ax.tick_params(labelsize=8)
        axes[0, col].legend(fontsize=7)


def plot_e2e(axes, rows: list) -> None:
    """Bars of step / frozen and peak / frozen per setup and dropout."""
    labels = [f"{r['setup']} {r['dropout'] if r['dropout'] is not None else ''}".strip() for r in rows]
    for ax, metric in zip(axes, ("step_vs_frozen", "peak_vs_frozen")):
        ax.bar(labels, [r.get(metric) or 0.0 for r in rows], color="tab:blue")
        for bound in E2E_TARGETS[metric]:
            ax.axhline(bound, linestyle="--", color="grey", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_title(f"training step: {metric.replace('_vs_', ' / ')}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)


def plot(paths, out: Path, rank: int = 16) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables, meta = load(paths)
    lora = [r for r in tables.get("lora_linear", []) if r.get("r") == rank]
    e2e = tables.get("e2e_train_step", [])
    if not lora and not e2e:
        raise SystemExit(f"no lora_linear rows with r={rank} and no e2e_train_step rows in "
                         f"{', '.join(map(str, paths))}")
    n_cols = max(1, len({(r["K"], r["N"]) for r in lora}))
    n_rows = (len(PANELS) if lora else 0) + (1 if e2e else 0)
    fig, axes = plt.subplots(n_rows, max(n_cols, 2 if e2e else 1), squeeze=False,
                             figsize=(4 * max(n_cols, 2), 3.2 * n_rows))
    if lora:
        plot_lora(axes[:len(PANELS)], lora, rank)
    if e2e:
        plot_e2e(axes[-1], e2e)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    fig.suptitle(f"fastpeft on {meta.get('gpu', '?')} ({meta.get('date', '?')[:10]}); grey dashes: issue 3's targets",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("ratios.png"))
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    print(plot(args.json, args.output, args.rank))


if __name__ == "__main__":
    main()
