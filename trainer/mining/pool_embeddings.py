"""The mining model and the pool's embeddings: each rank embeds its share of the candidate pool,
cached on disk under a key of everything the embeddings depend on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.core import distributed
from trainer.core.embedders import load_embedders as load_embedders_of
from trainer.core.model import resolve_device, resolve_model_path
from trainer.core.tokenizer import ends_with_eos, prompt_prefixes
from trainer.retrieval.search import (
    embed_shard,
    plan_by_length,
)

CACHE_CHUNK = 65536  # rows of the embeddings cache written or read per memory map


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
    """The mining model of cfg.model (a run's model.* keys) on this rank's device."""
    model = cfg.model
    device = resolve_device(cfg.device, distributed.read_env().local_rank)
    query_prefix, doc_prefix = prompt_prefixes(model)
    loaded = load_embedders_of(model.name_or_path, device, cfg.precision.value, model.pooling.value,
                               model.trust_remote_code, (query_prefix, doc_prefix),
                               (model.query_max_length, model.doc_max_length), cfg.batch_size, model.append_eos, say=say)
    settings = {
        "model": _model_fingerprint(resolve_model_path(model.name_or_path)), "pooling": model.pooling.value,
        "prefix": doc_prefix, "max_length": model.doc_max_length, "precision": cfg.precision.value,
        "append_eos": ends_with_eos(loaded.tokenizer), "query_prefix": query_prefix, "query_max_length": model.query_max_length,
    }
    return Embedders(device, loaded.embed_docs, loaded.embed_queries, loaded.batch_size, settings)
