"""Exact dense search that scales with the corpus and the number of ranks.

Used by evaluation and by hard-negative mining:
- texts are embedded in length-sorted batches dealt out round-robin to the ranks (`plan_batches`).
  The plan depends only on the texts' lengths, the batch size and the world size, so every rank
  computes it without talking, and a text lands in the same batch (same companions, same
  padding) whatever the number of ranks: 1 rank and N ranks get bit-identical embeddings;
- each rank keeps the embeddings of its own share of the corpus, and searches it chunk by chunk:
  peak memory is one (query chunk x document chunk) block, never the query x corpus matrix;
- the ranks' top-k lists are gathered and merged with one deterministic order (score, then the
  lower index), so the merged list equals a single-rank search's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from trainer.core import distributed

CHUNK_ELEMENTS = 1 << 24  # scores per block: 64 MB of fp32
DOC_CHUNK = 16384


@dataclass(frozen=True)
class EmbeddingPlan:
    """Every batch (arrays of text indices, longest texts first) and which rank embeds it."""

    batches: list[np.ndarray]
    world_size: int

    def rank_batches(self, rank: int) -> list[np.ndarray]:
        return self.batches[rank :: self.world_size]

    def rank_indices(self, rank: int) -> np.ndarray:
        batches = self.rank_batches(rank)
        return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)

    @property
    def batches_per_rank(self) -> int:
        return -(-len(self.batches) // self.world_size)


def plan_batches(texts: Sequence[str], batch_size: int, world_size: int) -> EmbeddingPlan:
    """Batches of `batch_size` texts by decreasing length (little padding), dealt round-robin."""
    return plan_by_length(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), batch_size, world_size)


def plan_by_length(lengths: np.ndarray, batch_size: int, world_size: int) -> EmbeddingPlan:
    """Batches of `batch_size` items by decreasing length, dealt round-robin to the ranks."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return EmbeddingPlan([order[i : i + batch_size] for i in range(0, len(order), batch_size)], world_size)


@torch.no_grad()
def embed_shard(
    embed_batch: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    plan: EmbeddingPlan,
    lockstep: bool = False,
    desc: str | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """This rank's (text indices, normalised fp32 embeddings on the encoder's device).

    lockstep: every rank runs the same number of forwards (a one-text forward when it has run out),
    for models whose forward is itself a collective (ZeRO-3 gathers parameters in every forward).
    """
    rank = distributed.rank()
    batches = plan.rank_batches(rank)
    indices = plan.rank_indices(rank)
    out, start = None, 0
    for index in tqdm(batches, desc=desc, disable=desc is None or not distributed.is_main(), leave=False):
        # A TextStore reads a batch with one take per stored chunk, not text by text.
        batch = texts.take(index) if hasattr(texts, "take") else [texts[i] for i in index]
        vectors = F.normalize(embed_batch(batch).float(), dim=-1)
        if out is None:  # filled in place: no second copy of the shard's embeddings
            out = vectors.new_empty((len(indices), vectors.shape[1]))
        out[start : start + len(vectors)] = vectors
        start += len(vectors)
    idle = plan.batches_per_rank - len(batches) if lockstep else 0
    for _ in range(idle):
        probe = embed_batch([texts[0]]).float()
    if out is None:  # fewer batches than ranks: this rank holds nothing (one forward tells the width)
        probe = probe if idle else embed_batch([texts[0]]).float()
        return indices, probe.new_zeros((0, probe.shape[1]))
    return indices, out


def gather_rows(local: torch.Tensor, plan: EmbeddingPlan, total: int) -> torch.Tensor:
    """Every rank's embed_shard rows put together in text order: (total, d) on every rank."""
    world = distributed.world_size()
    if world == 1:
        out = local.new_empty((total, local.shape[1]))
        out[torch.as_tensor(plan.rank_indices(0), device=local.device)] = local
        return out
    counts = [len(plan.rank_indices(r)) for r in range(world)]
    padded = local.new_zeros((max(counts), local.shape[1]))
    padded[: len(local)] = local
    gathered = distributed.gather_no_grad(padded).view(world, max(counts), -1)
    out = local.new_empty((total, local.shape[1]))
    for r in range(world):
        out[torch.as_tensor(plan.rank_indices(r), device=local.device)] = gathered[r, : counts[r]]
    return out


def embed_everywhere(
    embed_batch: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    batch_size: int,
    lockstep: bool = False,
    desc: str | None = None,
) -> torch.Tensor:
    """Every text's normalised embedding, in text order, on every rank: each rank embeds its
    share of the batches and the shares are gathered (for the queries of a search)."""
    plan = plan_batches(texts, batch_size, distributed.world_size())
    _, local = embed_shard(embed_batch, texts, plan, lockstep, desc)
    return gather_rows(local, plan, len(texts))


def _best(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row by score, ties to the lower id: one order, whatever the chunking."""
    by_id = ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), ids.gather(1, by_score)


def topk_search(
    queries: torch.Tensor, docs: torch.Tensor, doc_ids: torch.Tensor, k: int, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, ids), each (queries, k): the k documents of highest dot product, ids from doc_ids.

    Memory: one (query chunk x document chunk) block of at most chunk_elements scores. Rows with
    fewer than k documents are padded with score -inf and id -1.
    """
    doc_ids = doc_ids.to(docs.device, torch.int64)
    doc_chunk = max(1, min(len(docs), DOC_CHUNK))
    query_chunk = max(1, chunk_elements // doc_chunk)
    all_scores, all_ids = [], []
    for q0 in range(0, len(queries), query_chunk):
        block = queries[q0 : q0 + query_chunk].to(docs.dtype)
        best_scores = block.new_full((len(block), k), -torch.inf)
        best_ids = torch.full((len(block), k), -1, dtype=torch.int64, device=docs.device)
        for d0 in range(0, len(docs), doc_chunk):
            scores = block @ docs[d0 : d0 + doc_chunk].T
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, top.values], dim=1)
            merged_ids = torch.cat([best_ids, doc_ids[d0 : d0 + doc_chunk][top.indices]], dim=1)
            best_scores, best_ids = _best(merged_scores, merged_ids, k)
        all_scores.append(best_scores)
        all_ids.append(best_ids)
    if not all_scores:
        return queries.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.int64, device=queries.device)
    return torch.cat(all_scores), torch.cat(all_ids)


def merge_ranks(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (queries, k) top-k over its own documents -> the global top-k, on every rank."""
    world = distributed.world_size()
    if world == 1:
        return scores, ids
    queries, k = scores.shape
    all_scores = distributed.gather_no_grad(scores.contiguous()).view(world, queries, k)
    all_ids = distributed.gather_no_grad(ids.contiguous()).view(world, queries, k)
    flat = lambda x: x.permute(1, 0, 2).reshape(queries, world * k)  # noqa: E731
    return _best(flat(all_scores), flat(all_ids), k)


def shard_positions(doc_ids: torch.Tensor, corpus_size: int, device: torch.device | str) -> torch.Tensor:
    """Each corpus id's row in this rank's documents (doc_ids), -1 where another rank holds it:
    int32, 4 bytes a corpus text, while the rows fit. A caller that scores many batches of
    candidates (mining: three times a block) builds it once and passes it to score_candidates."""
    dtype = torch.int32 if len(doc_ids) < 2**31 else torch.int64
    position = torch.full((corpus_size,), -1, dtype=dtype, device=device)
    position[torch.as_tensor(doc_ids).to(device, torch.int64)] = torch.arange(len(doc_ids), dtype=dtype, device=device)
    return position


def score_candidates(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    docs: torch.Tensor,
    doc_ids: torch.Tensor,
    corpus_size: int,
    chunk_elements: int = CHUNK_ELEMENTS,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dot products of each query with its candidate documents (global ids, -1 = none -> NaN),
    when each rank holds only its own documents: each rank scores the candidates it holds and a
    sum over ranks puts them together. queries (Q, d) and candidates (Q, C) are the same on every
    rank; returns (Q, C) fp32 on the queries' device. positions: shard_positions(doc_ids, ...),
    if the caller holds it (else it is built here)."""
    device = docs.device
    position = shard_positions(doc_ids, corpus_size, device) if positions is None else positions
    candidates = candidates.to(device)
    out = torch.zeros(candidates.shape, dtype=torch.float32, device=device)
    rows = max(1, chunk_elements // max(1, candidates.shape[1] * docs.shape[1]))
    # A rank that holds no document (fewer embedding batches than ranks) adds zeros to the sum.
    for r0 in range(0, len(candidates) if len(docs) else 0, rows):
        block = candidates[r0 : r0 + rows]
        local = position[block.clamp(min=0)].long()
        held = (block >= 0) & (local >= 0)
        vectors = docs[local.clamp(min=0)]  # (rows, C, d)
        dots = torch.einsum("rcd,rd->rc", vectors, queries[r0 : r0 + rows].to(device, docs.dtype)).float()
        out[r0 : r0 + rows] = torch.where(held, dots, torch.zeros_like(dots))
    out = distributed.all_reduce(out)
    return out.masked_fill(candidates < 0, float("nan")).to(queries.device)
