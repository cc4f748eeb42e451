"""Curves of runs: loss, learning rate, accuracy and embedding spread by step, NDCG@10 and recall@10
at each evaluation, and the kept step of an early-stopped run.

    python -m trainer.plot RUN_DIR [RUN_DIR ...] [--out FILE]

One run draws RUN_DIR/curves.png; several are overlaid (e.g. the points of a sweep) and labelled
by the overrides that differ between them, into their common folder. A training run draws its own
curves.png at each evaluation and at the end (BackgroundPlot), in a child process of this module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.run.curves import CURVES_FILE, draw_curves, labels_for, load_run


def _default_out(run_dirs: list[Path]) -> Path:
    if len(run_dirs) == 1:
        return run_dirs[0] / CURVES_FILE
    parents = {d.resolve().parent for d in run_dirs}
    return (parents.pop() if len(parents) == 1 else Path.cwd()) / CURVES_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help="the picture (default: RUN_DIR/curves.png; several runs: their folder's)")
    parser.add_argument("--title")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    try:
        labels = labels_for(args.run_dirs) if len(args.run_dirs) > 1 else [None]
        runs = [load_run(d, label) for d, label in zip(args.run_dirs, labels)]
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = draw_curves(runs, args.out or _default_out(args.run_dirs), args.title)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
