"""Retrieval evaluation on a BEIR-layout folder: exact search, then NDCG@10, recall@10 and MRR@10
over the queries that have relevance judgements.

Every rank embeds its share of the queries and of the corpus and searches its share chunk by
chunk (search.py), so memory per rank is bounded and no rank idles while another works: the
ranks' top-10 lists are merged and the figures are those of a single-process exact search.
`python -m trainer.evaluate model=PATH data=BEIR_DIR` (trainer/tools/evaluate.py) runs it on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.data import DataError
from trainer.eval.beir import BeirSet
from trainer.eval.calibration import (
    Calibration,
    brier_score,
    expected_calibration_error,
)
from trainer.retrieval.search import (
    embed_everywhere,
    embed_shard,
    merge_ranks,
    plan_batches,
    score_candidates,
    topk_search,
)


def ranking_metrics(top: list[list[int]], data: BeirSet, k: int = 10) -> dict[str, float]:
    """top[i]: the corpus indices ranked first for query i, best first (-1 = none)."""
    ndcg = recall = mrr = 0.0
    for row, query_id in enumerate(data.query_ids):
        relevant = {doc: grade for doc, grade in data.qrels[query_id].items() if grade > 0}
        ranked = [data.corpus_ids[i] if i >= 0 else None for i in top[row][:k]]
        dcg = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked))
        ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(relevant.values(), reverse=True)[:k]))
        ndcg += dcg / ideal if ideal else 0.0
        recall += sum(doc in relevant for doc in ranked) / len(relevant) if relevant else 0.0
        mrr += next((1.0 / (rank + 1) for rank, doc in enumerate(ranked) if doc in relevant), 0.0)
    n = max(len(data.query_ids), 1)
    return {f"ndcg@{k}": ndcg / n, f"recall@{k}": recall / n, f"mrr@{k}": mrr / n}


@dataclass
class EmbeddedSet:
    """An evaluation set embedded: every query on every rank, each rank's share of the corpus."""

    queries: torch.Tensor
    doc_ids: np.ndarray
    docs: torch.Tensor


def embed_eval_set(embed_queries, embed_docs, data: BeirSet, batch_size: int, lockstep: bool = False,
                   progress: bool = False) -> EmbeddedSet:
    """A collective: every rank embeds its share of the queries (then gathered) and of the corpus."""
    from trainer.core import distributed

    if not data.query_ids or not data.corpus_ids:
        raise DataError("the evaluation set has no judged queries or no documents")
    queries = embed_everywhere(embed_queries, data.query_texts, batch_size, lockstep, "embed queries" if progress else None)
    doc_plan = plan_batches(data.corpus_texts, batch_size, distributed.world_size())
    doc_ids, docs = embed_shard(embed_docs, data.corpus_texts, doc_plan, lockstep, "embed corpus" if progress else None)
    return EmbeddedSet(queries, doc_ids, docs)


@dataclass
class JudgedPairs:
    """(query, document) pairs with a 0/1 relevance label and the model's cosine for each."""

    scores: np.ndarray
    labels: np.ndarray
    queries: np.ndarray
    """Each pair's query (its index in the set's query_ids): folds split by query, never inside one."""


def judged_pairs(embedded: EmbeddedSet, data: BeirSet) -> JudgedPairs:
    """Each query's relevant documents (qrels grade > 0) and as many non-relevant ones: those it
    ranks highest, the ones a threshold has to tell apart. A collective; every rank gets the same
    pairs in the same order, each scored by one dot product whatever the number of ranks."""
    position = {doc: i for i, doc in enumerate(data.corpus_ids)}
    relevant = [sorted(position[d] for d, g in data.qrels[q].items() if g > 0 and d in position) for q in data.query_ids]
    width = max((len(r) for r in relevant), default=0)
    if width == 0:
        raise DataError("no judged query has a relevant document (qrels score > 0) in the corpus: nothing to calibrate on")
    doc_ids = torch.as_tensor(embedded.doc_ids)
    k = min(len(data.corpus_ids), 2 * width)  # holds at least len(relevant) documents that are not relevant
    _, top = merge_ranks(*topk_search(embedded.queries, embedded.docs, doc_ids, k))
    candidates, labels, owners = [], [], []
    for row, (top_row, rel) in enumerate(zip(top.tolist(), relevant)):
        chosen = set(rel)
        negatives = [i for i in top_row if i >= 0 and i not in chosen][: len(rel)]
        candidates.append(rel + negatives + [-1] * (2 * width - len(rel) - len(negatives)))
        labels += [1] * len(rel) + [0] * len(negatives)
        owners += [row] * (len(rel) + len(negatives))
    scores = score_candidates(embedded.queries, torch.tensor(candidates), embedded.docs, doc_ids, len(data.corpus_ids))
    flat = scores.cpu().double().numpy().ravel()
    return JudgedPairs(flat[~np.isnan(flat)], np.asarray(labels, dtype=np.int64), np.asarray(owners, dtype=np.int64))


def evaluate(
    embed_queries: Callable[[list[str]], torch.Tensor],
    embed_docs: Callable[[list[str]], torch.Tensor],
    data: BeirSet,
    batch_size: int = 128,
    k: int = 10,
    lockstep: bool = False,
    progress: bool = False,
    dims: Sequence[int] = (),
    calibration: Calibration | None = None,
) -> dict[str, float]:
    """The metrics, on every rank (a collective: every rank calls it with the same data).

    lockstep: every rank runs the same number of forwards (ZeRO-3, where a forward is collective).
    dims: Matryoshka sizes to report as well, from the same embeddings truncated and normalised
    again: "ndcg@10/dim64" and so on (a size equal to the full one is the plain figures).
    calibration: also report its ECE and Brier score on the set's judged pairs (judged_pairs).
    """
    embedded = embed_eval_set(embed_queries, embed_docs, data, batch_size, lockstep, progress)
    queries, doc_ids, docs = embedded.queries, embedded.doc_ids, embedded.docs

    def metrics_at(q: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
        _, ids = merge_ranks(*topk_search(q, d, torch.as_tensor(doc_ids), k))
        return ranking_metrics(ids.tolist(), data, k)

    result = metrics_at(queries, docs)
    for dim in sorted(set(dims), reverse=True):
        if dim < queries.shape[1]:
            truncated = metrics_at(F.normalize(queries[:, :dim], dim=-1), F.normalize(docs[:, :dim], dim=-1))
            result.update({f"{name}/dim{dim}": value for name, value in truncated.items()})
    if calibration is not None:
        pairs = judged_pairs(embedded, data)
        probs = calibration.apply(pairs.scores)
        result["ece"] = expected_calibration_error(probs, pairs.labels)
        result["brier"] = brier_score(probs, pairs.labels)
    return result
