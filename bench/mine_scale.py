"""`python -m trainer.mine` at scale: synthetic pairs with a tiny random model (so that embedding
is cheap and retrieval, filtering and bookkeeping are what is measured), per size and number of
ranks: wall time, CPU seconds (all ranks), peak RSS per rank and the output rate.

    python bench/mine_scale.py --sizes 100000 1000000 --nproc 1 2 [--retriever hybrid]

Each run is `torchrun --nproc_per_node=N bench/mine_scale.py --worker ...`: every rank runs the
tool in-process and reports its own peak RSS and CPU time. The pool is the input's positives
(as many distinct texts as rows), so pool and queries grow together.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_input(path: Path, rows: int, seed: int = 0) -> Path:
    """Rows whose query is 4 words of its positive (12 words; 120-word vocabulary): every positive
    distinct, queries mostly distinct."""
    from tests.tiny import WORDS

    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(rows):
            words = rng.choices(WORDS, k=12)
            handle.write(json.dumps({"query": " ".join(rng.sample(words, 4)), "positive": " ".join(words) + f" w{i % 120}"}) + "\n")
    return path


def worker(args) -> None:
    from trainer.mine import main as mine_main

    sys.argv = ["trainer.mine", *args.overrides]
    mine_main()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"rank": int(os.environ.get("RANK", 0)), "peak_rss_gib": usage.ru_maxrss / 2**20,
              "cpu_s": usage.ru_utime + usage.ru_stime}
    Path(args.report).with_suffix(f".rank{report['rank']}.json").write_text(json.dumps(report))


def run(root: Path, rows: int, nproc: int, retriever: str, model: Path) -> dict:
    data = root / f"pairs-{rows}.jsonl"
    if not data.exists():
        write_input(data, rows)
    output = root / f"mined-{rows}-{nproc}.jsonl"
    report = root / f"report-{rows}-{nproc}"
    overrides = [f"input={data}", f"output={output}", "overwrite=true", f"model.name_or_path={model}",
                 f"retriever={retriever}", "num_negatives=3", "range_max=30", "batch_size=512"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--worker", "--report", str(report), "--", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        return {"rows": rows, "nproc": nproc, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    ranks = [json.loads(report.with_suffix(f".rank{r}.json").read_text()) for r in range(nproc)]
    written = sum(1 for _ in open(output))
    return {"rows": rows, "nproc": nproc, "wall_s": wall, "cpu_s": sum(r["cpu_s"] for r in ranks),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in ranks), "rows_per_s": rows / wall, "written": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100000])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--retriever", default="hybrid", choices=["bm25", "dense", "hybrid"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from tests.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_tiny_model(root / "model")
        print(f"retriever {args.retriever}; tiny random BERT (hidden 32, 2 layers); pool = the positives")
        print("| rows | ranks | wall s | CPU s (all ranks) | peak RSS per rank GiB | rows/s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for rows in args.sizes:
            for nproc in args.nproc:
                r = run(root, rows, nproc, args.retriever, model)
                if "error" in r:
                    print(f"| {rows} | {nproc} | failed: {r['error']} | | | |", flush=True)
                    continue
                print(f"| {rows} | {nproc} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_gib']:.2f} | "
                      f"{r['rows_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
