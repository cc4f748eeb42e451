"""The table of a sweep: one row per sweep point, its swept settings and final eval metrics.

    python -m trainer.summary multirun/2026-11-22/12-00-00 [--metric ndcg@10]

Prints the table, and writes summary.csv and summary.png (a heatmap of the metric over the first
two swept keys, averaged over any others) into the sweep directory.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

from trainer.run.files import EVAL_FILE, METRICS_FILE, overrides_dict, read_records
from trainer.run.files import EVAL_METRICS as METRICS


def collect(sweep_dir: Path) -> tuple[list[str], list[dict]]:
    """(the keys whose values differ across points, one row per finished point)."""
    points = []
    for run_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        if not (run_dir / ".hydra" / "overrides.yaml").exists():
            continue
        evals = read_records(run_dir / EVAL_FILE)
        records = read_records(run_dir / METRICS_FILE)
        row = {"run": run_dir.name, **overrides_dict(run_dir)}
        row.update({m: evals[-1].get(m) if evals else None for m in METRICS})
        row["step"] = evals[-1]["step"] if evals else None
        row["final_loss"] = records[-1]["loss"] if records else None
        points.append(row)
    keys = sorted({k for p in points for k in p} - {"run", "step", "final_loss", *METRICS})
    swept = [k for k in keys if len({p.get(k) for p in points}) > 1]
    return swept, points


def write_csv(path: Path, swept: list[str], points: list[dict]) -> None:
    columns = ["run", *swept, *METRICS, "step", "final_loss"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)


def write_heatmap(path: Path, swept: list[str], points: list[dict], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_key = swept[0] if swept else None
    col_key = swept[1] if len(swept) > 1 else None
    cells = defaultdict(list)
    for p in points:
        if p.get(metric) is not None:
            cells[(p.get(row_key), p.get(col_key))].append(p[metric])
    rows = sorted({r for r, _ in cells}, key=_sort_key)
    cols = sorted({c for _, c in cells}, key=_sort_key)
    grid = [[sum(cells[(r, c)]) / len(cells[(r, c)]) if cells.get((r, c)) else float("nan") for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(cols), 1.2 + 0.8 * len(rows)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(col_key or "")
    ax.set_ylabel(row_key or "")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            ax.text(j, i, f"{value:.4f}", ha="center", va="center", color="w")
    extra = f" (mean over {', '.join(swept[2:])})" if len(swept) > 2 else ""
    ax.set_title(f"{metric}{extra}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sort_key(value):
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="ndcg@10", choices=METRICS)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir}: no such sweep directory", file=sys.stderr)
        return 2
    swept, points = collect(args.sweep_dir)
    if not points:
        print(f"error: {args.sweep_dir}: no sweep points (folders with .hydra/overrides.yaml)", file=sys.stderr)
        return 2
    columns = ["run", *swept, *METRICS, "final_loss"]
    print("  ".join(f"{c:>12}" for c in columns))
    for p in points:
        print("  ".join(f"{p.get(c):>12.4f}" if isinstance(p.get(c), float) else f"{str(p.get(c)):>12}" for c in columns))
    write_csv(args.sweep_dir / "summary.csv", swept, points)
    metric = args.metric
    if all(p.get(metric) is None for p in points):
        print(f"no run has {metric} (were they evaluated? eval.data); the heatmap shows final_loss")
        metric = "final_loss"
    write_heatmap(args.sweep_dir / "summary.png", swept, points, metric)
    print(f"wrote {args.sweep_dir / 'summary.csv'} and {args.sweep_dir / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
