"""The recipe's last stage on the Debian data: a teacher's scores, distilled, against the same
training without them.

  1. The teacher: all-MiniLM-L6-v2 fine-tuned by this framework on --teacher-rows pairs of the
     shared Debian train file (a seeded sample; the dev set's package stems are not in it), one
     epoch at batch 64. Nothing stronger installs offline (no cross-encoder or larger embedder
     is packaged on the package index), and a model fitted to this domain ranks its texts better
     than the general one the student starts from: its dev NDCG@10 is reported.
  2. Mining (as bench/recipe.py): --num-negatives hybrid-mined negatives per pair of the demo's
     3,000-pair sample, by the student model.
  3. Scoring: `python -m trainer.score` with the teacher (a bi-encoder: cosines); pairs/s reported.
  4. The student, all-MiniLM-L6-v2, the demo's training (24 steps, batch 32, seed 42) on the
     scored rows twice: InfoNCE with the mined negatives, and the same + KL towards the teacher
     (loss.distill=kl, teacher_temperature = the student's 0.05: both score cosines). Dev NDCG@10
     of each, at equal steps.

    python bench/distill_recipe.py                  # about 45 minutes on 2 CPU cores
    python bench/distill_recipe.py --teacher-rows 2000 --also-margin-mse
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import recipe  # noqa: E402  (mining and training as the recipe bench runs them)

SHARED_TRAIN = REPO.parent / "shared/data/debian-descriptions/train.jsonl.gz"


def teacher_data(rows: int, path: Path) -> Path:
    source = SHARED_TRAIN if SHARED_TRAIN.exists() else recipe.SAMPLE
    lines = [json.loads(line) for line in gzip.open(source, "rt", encoding="utf-8")]
    random.Random(7).shuffle(lines)
    with open(path, "w", encoding="utf-8") as out:
        for row in lines[:rows]:
            out.write(json.dumps({"query": row["query"], "positive": row["positive"]}) + "\n")
    return path


def score(root: Path, teacher: Path, mined: Path, output: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from trainer.run import config
    from trainer.tools.score import score as run_score

    config.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf" / "tools")):
        cfg = compose(config_name="score", overrides=[f"input={mined}", f"output={output}", f"teacher={teacher}",
                                                      "teacher_max_length=128", "teacher_batch_size=64", "overwrite=true"])
    return run_score(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-rows", type=int, default=6000)
    parser.add_argument("--num-negatives", type=int, default=3)
    parser.add_argument("--also-margin-mse", action="store_true")
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="distill-recipe-"))
    root.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    teacher_run = root / "teacher"
    steps = args.teacher_rows // 64
    teacher = recipe.train(teacher_run, f"data.train={teacher_data(args.teacher_rows, root / 'teacher-train.jsonl')}",
                           "data.batch_size=64", f"trainer.max_steps={steps}", f"trainer.warmup_steps={steps // 10}")
    print(f"teacher: {args.teacher_rows} pairs, {steps} steps of 64: dev NDCG@10 {teacher['before']:.4f} -> "
          f"{teacher['after']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    mined = root / "mined.jsonl"
    mining = recipe.mine_once(root, "hybrid", args.num_negatives, mined)
    scored = root / "scored.jsonl"
    scoring = score(root, teacher_run / "model", mined, scored)
    print(f"mined {mining['rows_out']} rows; teacher scored {scoring['pairs']} pairs at {scoring['pairs_per_s']:.1f} pairs/s",
          flush=True)

    common = [f"data.train={scored}", f"data.num_negatives={args.num_negatives}"]
    runs = {"InfoNCE, mined negatives": recipe.train(root / "infonce", *common)}
    runs["InfoNCE + KL to the teacher"] = recipe.train(root / "kl", *common, "loss.distill=kl", "loss.teacher_temperature=0.05")
    if args.also_margin_mse:
        runs["InfoNCE + MarginMSE to the teacher"] = recipe.train(root / "margin", *common, "loss.distill=margin_mse")
    print(f"\nThe demo's training (24 steps, batch 32, seed 42) on {args.num_negatives} mined negatives per pair, "
          f"dev NDCG@10 (teacher: {teacher['after']:.4f})\n")
    print("| student loss | NDCG@10 before | after | seconds |\n|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['before']:.4f} | {r['after']:.4f} | {r['seconds']:.0f} |")
    last = json.loads((root / "kl" / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"\nlast step of the KL run: loss_contrastive {last['loss_contrastive']:.4f}, loss_distill "
          f"{last['loss_distill']:.4f}, rank_agreement {last['rank_agreement']:.3f}; all files in {root}")


if __name__ == "__main__":
    main()
