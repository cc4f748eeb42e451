"""`python -m trainer.mine` at scale: synthetic pairs with a tiny random model (so that embedding
is cheap and retrieval, filtering and bookkeeping are what is measured), per size and number of
ranks: wall time, CPU seconds (all ranks), peak RSS per rank and the output rate.

    python bench/mine_scale.py --sizes 100000 1000000 --nproc 1 2 [--retriever hybrid]
        [--baseline-rev f21fda9 --baseline-sizes 100000] [--kill] [--probe 10000000 --probe-blocks 3]

Each run is `torchrun --nproc_per_node=N bench/mine_scale.py --worker ...`: every rank runs the
tool in-process and reports its own peak RSS and CPU time. The pool is the input's positives
(as many distinct texts as rows), so pool and queries grow together. The filter is off
(max_score_ratio=null): a random model's cosines are all alike and the filter would drop
nearly every row, leaving the output's cost unmeasured.

--baseline-rev runs the tool of an earlier commit (a git worktree of this repository) in the same
run, side by side. --kill SIGKILLs the first size's 1-rank run once two blocks are done, runs
it again, and reports whether the output equals the uninterrupted one and how many blocks were
mined twice (a part file written but not yet counted by the manifest when it died).

--probe SIZE runs a size too large to finish here only until its manifest counts --probe-blocks
blocks, then kills it: the peak RSS per rank so far (the kernel's high-water mark, VmHWM, of each
worker), the seconds until the first block was done (reading, indexing and embedding the pool)
and per block after it, and the whole run's time projected from those. Mining holds one block
at a time, so the peak over the first blocks is the run's, unless something grows per block.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_input(path: Path, rows: int, seed: int = 0) -> Path:
    """Rows whose positive is 12 words drawn from a Zipfian vocabulary of 50,000 words (the tiny
    model's 120 first, the rest unknown to its tokenizer) and whose query is 4 of those words:
    text-like term statistics, so that BM25's postings are as sparse as with real text. Positives
    repeat rarely (a handful in a million), so the pool has about as many texts as rows."""
    from tests.tiny import WORDS

    rng = random.Random(seed)
    vocabulary = WORDS + [f"v{i}" for i in range(50000 - len(WORDS))]
    cumulative = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(vocabulary))))
    with open(path, "w") as handle:
        for _ in range(rows):
            words = rng.choices(vocabulary, cum_weights=cumulative, k=12)
            handle.write(json.dumps({"query": " ".join(rng.sample(words, 4)), "positive": " ".join(words)}) + "\n")
    return path


def worker(args) -> None:
    sys.path.insert(0, os.environ["PYTHONPATH"])  # the repository under test: this one or a baseline's worktree
    from trainer.tools.mine import main as mine_main

    sys.argv = ["trainer.mine", *args.overrides]
    mine_main()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"rank": int(os.environ.get("RANK", 0)), "peak_rss_gib": usage.ru_maxrss / 2**20,
              "cpu_s": usage.ru_utime + usage.ru_stime}
    Path(args.report).with_suffix(f".rank{report['rank']}.json").write_text(json.dumps(report))


def command(rows: int, nproc: int, data: Path, output: Path, retriever: str, model: Path, report: Path,
            repo: Path = REPO) -> tuple[list[str], dict]:
    overrides = [f"input={data}", f"output={output}", "overwrite=true", f"model.name_or_path={model}",
                 f"retriever={retriever}", "num_negatives=3", "range_max=30", "batch_size=512", "max_score_ratio=null"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--worker", "--report", str(report), "--", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(repo))
    return cmd, env


def run(root: Path, rows: int, nproc: int, retriever: str, model: Path, repo: Path = REPO, label: str = "") -> dict:
    data = root / f"pairs-{rows}.jsonl"
    if not data.exists():
        write_input(data, rows)
    output = root / f"mined-{rows}-{nproc}{label}.jsonl"
    report = root / f"report-{rows}-{nproc}{label}"
    cmd, env = command(rows, nproc, data, output, retriever, model, report, repo)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        return {"rows": rows, "nproc": nproc, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    ranks = [json.loads(report.with_suffix(f".rank{r}.json").read_text()) for r in range(nproc)]
    written = sum(1 for _ in open(output))
    return {"rows": rows, "nproc": nproc, "wall_s": wall, "cpu_s": sum(r["cpu_s"] for r in ranks),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in ranks), "rows_per_s": rows / wall, "written": written,
            "output": output}


def killed_and_resumed(root: Path, rows: int, retriever: str, model: Path, expected: Path) -> str:
    """SIGKILL a 1-rank run once its manifest counts 2 blocks, run it again; what came of it."""
    data, output = root / f"pairs-{rows}.jsonl", root / f"killed-{rows}.jsonl"
    cmd, env = command(rows, 1, data, output, retriever, model, root / "report-killed")
    manifest = output.with_name(output.name + ".parts") / "manifest.json"
    # The worker itself, without torchrun (one process needs none): torchrun starts its workers
    # in sessions of their own, where killing torchrun's would leave the worker running.
    worker_cmd = [sys.executable, *cmd[cmd.index(str(Path(__file__).resolve())) :]]
    proc = subprocess.Popen(worker_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["done"]) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    if not manifest.exists() or proc.returncode == 0:
        return f"not killed: the {rows}-row run ended before its manifest counted 2 blocks (too few blocks)"
    parts = manifest.parent
    counted = len(json.loads(manifest.read_text())["done"])
    written = len(list(parts.glob("part-*.jsonl")))
    subprocess.run(cmd, env=env, capture_output=True, check=True)
    same = output.read_bytes() == expected.read_bytes()
    return (f"killed with {counted} blocks counted and {written} part files; run again: output "
            f"{'identical' if same else 'DIFFERENT'}, {written - counted} block(s) mined twice")


def worker_pids(report: Path) -> list[int]:
    """The processes running this bench's worker for a report path (torchrun's children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"--worker" in cmdline and str(report).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def first_blocks(root: Path, rows: int, nproc: int, retriever: str, model: Path, blocks: int) -> str:
    """Run a size until its manifest counts `blocks` blocks, then kill it (see --probe)."""
    data, output, report = root / f"pairs-{rows}.jsonl", root / f"probe-{rows}-{nproc}.jsonl", root / "report-probe"
    if not data.exists():
        write_input(data, rows)
    cmd, env = command(rows, nproc, data, output, retriever, model, report)
    manifest = output.with_name(output.name + ".parts") / "manifest.json"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started, first, peaks, done = time.perf_counter(), None, {}, 0
    while proc.poll() is None and done < blocks:
        for pid in worker_pids(report):
            try:
                peaks[pid] = peak_rss_gib(pid)
            except OSError:  # it ended between the listing and the read
                pass
        try:
            done = len(json.loads(manifest.read_text())["done"])
        except (OSError, ValueError):
            done = 0
        if done and first is None:
            first = time.perf_counter() - started
        time.sleep(0.5)
    elapsed = time.perf_counter() - started
    for pid in [*worker_pids(report), proc.pid]:  # torchrun's workers live in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    if done < blocks or first is None:
        return f"probe {rows} rows, {nproc} rank(s): ended after {elapsed:.0f} s with {done} block(s) counted"
    per_block = (elapsed - first) / max(done - 1, 1)
    from trainer.tools.configs import MineConfig

    total_blocks = -(-rows // MineConfig.block_rows)
    return (f"probe {rows} rows, {nproc} rank(s), killed after {done} of {total_blocks} blocks: peak RSS per rank "
            f"{max(peaks.values()):.2f} GiB; first block done at {first:.0f} s, then {per_block:.0f} s per block; "
            f"whole run projected {first + per_block * (total_blocks - 1):.0f} s")


def baseline_repo(root: Path, rev: str) -> Path:
    folder = root / f"baseline-{rev}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), rev], check=True,
                   capture_output=True)
    return folder


def row(label: str, r: dict) -> str:
    if "error" in r:
        return f"| {label} | {r['rows']} | {r['nproc']} | failed: {r['error']} | | | |"
    return (f"| {label} | {r['rows']} | {r['nproc']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_gib']:.2f} | "
            f"{r['rows_per_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100000])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--retriever", default="hybrid", choices=["bm25", "dense", "hybrid"])
    parser.add_argument("--baseline-rev", help="also run the tool of this earlier commit")
    parser.add_argument("--baseline-sizes", type=int, nargs="+", help="sizes for the baseline (default: --sizes)")
    parser.add_argument("--kill", action="store_true", help="kill and resume the first size's 1-rank run")
    parser.add_argument("--probe", type=int, nargs="*", default=[], help="sizes run only for their first blocks")
    parser.add_argument("--probe-blocks", type=int, default=3)
    parser.add_argument("--probe-nproc", type=int, nargs="+", default=[1], help="ranks for the probed sizes")
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
        baseline = baseline_repo(root, args.baseline_rev) if args.baseline_rev else None
        print(f"retriever {args.retriever}; tiny random BERT (hidden 32, 2 layers); pool = the positives; Zipfian words; "
              f"{os.cpu_count()} CPU cores")
        print("| tool | rows | ranks | wall s | CPU s (all ranks) | peak RSS per rank GiB | rows/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        results = {}
        try:
            for rows in args.sizes:
                for nproc in args.nproc:
                    if baseline is not None and rows in (args.baseline_sizes or args.sizes):
                        print(row(f"before ({args.baseline_rev})", run(root, rows, nproc, args.retriever, model, baseline,
                                                                       "-baseline")), flush=True)
                    results[rows, nproc] = run(root, rows, nproc, args.retriever, model)
                    print(row("now", results[rows, nproc]), flush=True)
            summarize(results, args)
            first = (args.sizes[0], 1)
            if args.kill and "output" in results.get(first, {}):
                print(killed_and_resumed(root, args.sizes[0], args.retriever, model, results[first]["output"]))
            for rows in args.probe:
                for nproc in args.probe_nproc:
                    print(first_blocks(root, rows, nproc, args.retriever, model, args.probe_blocks), flush=True)
        finally:
            if baseline is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], capture_output=True)
                shutil.rmtree(baseline, ignore_errors=True)


def summarize(results: dict, args) -> None:
    """The targets' ratios: RSS of the largest size over the smallest, CPU of N ranks over 1."""
    ok = {key: r for key, r in results.items() if "error" not in r}
    small, large = min(args.sizes), max(args.sizes)
    for nproc in args.nproc:
        if large != small and (small, nproc) in ok and (large, nproc) in ok:
            ratio = ok[large, nproc]["peak_rss_gib"] / ok[small, nproc]["peak_rss_gib"]
            print(f"peak RSS per rank, {large} / {small} rows, {nproc} rank(s): {ratio:.2f}x")
    for rows in args.sizes:
        for nproc in args.nproc:
            if nproc > 1 and (rows, 1) in ok and (rows, nproc) in ok:
                ratio = ok[rows, nproc]["cpu_s"] / ok[rows, 1]["cpu_s"]
                same = ok[rows, nproc]["output"].read_bytes() == ok[rows, 1]["output"].read_bytes()
                print(f"CPU seconds, {nproc} ranks / 1 rank, {rows} rows: {ratio:.2f}x; outputs "
                      f"{'identical' if same else 'differ'}")


if __name__ == "__main__":
    main()
