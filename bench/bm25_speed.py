"""BM25 retrieval for mining, side by side on the same pool and queries: what `python -m
trainer.mine` did before (one bm25s index over the whole pool, numpy backend, one thread) against
trainer.retrieval.bm25.ShardIndex (the pool's statistics, numba backend with threads, lists ranked by
score then id), with the lists compared rank by rank.

    python bench/bm25_speed.py [--pool 50000] [--queries 3000] [--k 100] [--threads 2]

Pool and queries are the Debian descriptions (../shared/data/debian-descriptions, else the
repository's sample, repeated with a tag per copy): positives form the pool, synopses the queries.
bm25s's order among equal scores is arbitrary, so the earlier lists are put in (score, id) order
within themselves before comparing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEBIAN = [REPO.parent / "shared/data/debian-descriptions/train.jsonl.gz", REPO / "data/debian-sample/train.jsonl.gz"]


def texts(pool_size: int, query_count: int) -> tuple[list[str], list[str]]:
    path = next(p for p in DEBIAN if p.exists())
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for line in handle]
    pool, queries, copy = [], [], 0
    while len(pool) < pool_size:
        tag = f" v{copy}" if copy else ""
        pool += [r["positive"] + tag for r in rows]
        queries += [r["query"] + tag for r in rows]
        copy += 1
    return pool[:pool_size], queries[:query_count]


def before(pool: list[str], queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    import bm25s

    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(pool, stopwords="en", show_progress=False), show_progress=False)
    indexed = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    ids, scores = retriever.retrieve(tokens, k=k, show_progress=False)
    return np.asarray(ids), np.asarray(scores, dtype=np.float32), indexed, time.perf_counter() - t0


def after(pool: list[str], queries: list[str], k: int, backend: str, threads: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    from trainer.retrieval.bm25 import ShardIndex, tokenize

    t0 = time.perf_counter()
    index = ShardIndex(pool, backend=backend, threads=threads)
    indexed = time.perf_counter() - t0
    if backend == "numba":  # compiled once per process (~5 s), outside the timing
        index.search(tokenize(queries[:2]), k)
    t0 = time.perf_counter()
    scores, ids = index.search(tokenize(queries), k)
    return ids, scores, indexed, time.perf_counter() - t0


def main() -> None:
    from trainer.retrieval.bm25 import _canonical

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=50000)
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pool, queries = texts(args.pool, args.queries)
    base_ids, base_scores, base_index, base_time = before(pool, queries, args.k)
    base_scores, base_ids = _canonical(base_scores, base_ids, args.k)
    base_ids = np.where(base_scores > 0, base_ids, -1)
    runs = {f"ShardIndex, numba, {args.threads} threads": after(pool, queries, args.k, "numba", args.threads),
            "ShardIndex, numba, 1 thread": after(pool, queries, args.k, "numba", 1),
            "ShardIndex, numpy, 1 thread": after(pool, queries, args.k, "numpy", 1)}
    print(f"pool {len(pool)}, queries {len(queries)}, k {args.k}")
    # Above a row's k-th score the membership is not a matter of ties: those entries must agree.
    above = base_scores > base_scores[:, -1:]
    print("| retrieval | index s | queries/s | speed-up | scores equal at every rank | lists identical | identical above the k-th score's ties |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| before: bm25s numpy, 1 thread | {base_index:.1f} | {len(queries) / base_time:.0f} | 1.0x | | | |")
    for name, (ids, scores, indexed, took) in runs.items():
        both = base_ids >= 0
        equal = (np.where(both, scores, 0) == np.where(both, base_scores, 0)).all(axis=1).mean()
        same = (ids == base_ids).all(axis=1).mean()
        same_above = (np.where(above, ids, -2) == np.where(above, base_ids, -2)).all(axis=1).mean()
        print(f"| {name} | {indexed:.1f} | {len(queries) / took:.0f} | {base_time / took:.1f}x | {equal:.2%} | {same:.2%} | "
              f"{same_above:.2%} |")


if __name__ == "__main__":
    main()
