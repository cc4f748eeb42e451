"""The recipe on the bundled Debian sample: mining throughput per retriever, then the demo's
training with the mined negatives against the demo's training with in-batch negatives only
(same steps, same seed), each scored by dev NDCG@10.

  python bench/recipe.py                           # about 20 minutes on 2 CPU cores
  python bench/recipe.py --num-negatives 3 --skip-training

Mining runs in this process (model load included in its time): hybrid first with an empty
embedding cache (cold), then dense and bm25 reusing the candidates' cached embeddings (warm).
The trainings are `python -m trainer` subprocesses with the demo's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "data" / "debian-sample" / "train.jsonl.gz"


def mine_once(root: Path, retriever: str, num_negatives: int, output: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from trainer.run import config
    from trainer.mining.miner import mine

    config.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf" / "tools")):
        cfg = compose(config_name="mine", overrides=[
            f"input={SAMPLE}", f"output={output}", f"retriever={retriever}", f"num_negatives={num_negatives}",
            f"embeddings_cache={root / 'cache'}", "overwrite=true",
        ])
    return mine(cfg)


def train(run_dir: Path, *overrides: str) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "wandb.mode=disabled", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    return {"before": evals[0]["ndcg@10"], "after": evals[-1]["ndcg@10"], "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-negatives", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--with-early-stopping", action="store_true", help="also run the README's recipe command")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="recipe-"))
    mined = root / "mined.jsonl"

    rows = []
    for retriever, cache in (("hybrid", "cold"), ("dense", "warm"), ("bm25", "warm")):
        output = mined if retriever == "hybrid" else root / f"mined-{retriever}.jsonl"
        summary = mine_once(root, retriever, args.num_negatives, output)
        rows.append((retriever, cache, summary))
    print(f"\nMining {SAMPLE.name} ({rows[0][2]['rows_in']} pairs), {args.num_negatives} negatives, ranks 0..100, "
          f"filter 0.95 x positive, {os.cpu_count()} CPU cores\n")
    print("| retriever | embeddings | pairs/s | seconds | rows out | candidates | dropped by filter | mean cos pos / neg |")
    print("|---|---|---|---|---|---|---|---|")
    for retriever, cache, s in rows:
        print(f"| {retriever} | {cache} | {s['pairs_per_s']:.1f} | {s['seconds']:.1f} | {s['rows_out']} | {s['candidates']} | "
              f"{s['dropped_by_filter']} ({s['dropped_by_filter'] / max(s['candidates'], 1):.1%}) | "
              f"{s['mean_positive_score']:.3f} / {s['mean_negative_score']:.3f} |")
    if args.skip_training:
        return

    plain = train(root / "in-batch")
    hard = train(root / "mined", f"data.train={mined}", f"data.num_negatives={args.num_negatives}")
    print("\nThe demo's training (24 steps, batch 32, seed 42), dev NDCG@10 on data/debian-sample/dev\n")
    print("| negatives | NDCG@10 before | after | seconds |")
    print("|---|---|---|---|")
    print(f"| in-batch only | {plain['before']:.4f} | {plain['after']:.4f} | {plain['seconds']:.0f} |")
    print(f"| in-batch + {args.num_negatives} mined (hybrid) | {hard['before']:.4f} | {hard['after']:.4f} | {hard['seconds']:.0f} |")
    if args.with_early_stopping:  # the README's recipe command, evaluated every 6 steps
        run_dir = root / "recipe"
        recipe = train(run_dir, f"data.train={mined}", f"data.num_negatives={args.num_negatives}", "eval.every=6",
                       "trainer.early_stopping.patience=2")
        best = json.loads((run_dir / "best.json").read_text())
        curve = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
        print(f"\nWith eval.every=6 trainer.early_stopping.patience=2: curve "
              + ", ".join(f"{e['step']}: {e['ndcg@10']:.4f}" for e in curve)
              + f"; model/ = step {best['step']} ({best['value']:.4f}); {recipe['seconds']:.0f} s")


if __name__ == "__main__":
    main()
