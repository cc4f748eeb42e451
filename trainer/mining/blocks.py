"""One block of input rows mined against the pool each rank holds: ranked lists (BM25, dense or
fused), the false-negative filter, the negatives chosen, the output lines.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from trainer.data import Columns
from trainer.data.records import FLAG_SCORES
from trainer.mining.negatives import choose, draw_keys, drop_excluded, fuse
from trainer.mining.pool import MiningInput
from trainer.mining.pool_embeddings import Embedders
from trainer.retrieval.ann import recall
from trainer.retrieval.bm25 import ranked_lists
from trainer.retrieval.search import (
    embed_everywhere,
    merge_ranks,
    score_candidates,
    shard_positions,
    topk_search,
)

QUERY_BLOCK = 8192  # queries searched (and lists gathered) at a time: bounds the gathered top-k lists


STAT_KEYS = ("rows_in", "rows_out", "candidates", "dropped_by_filter", "positive_sum", "negative_sum", "ann_hits",
             "ann_total")


def dense_lists(queries: torch.Tensor, docs: torch.Tensor, doc_ids: np.ndarray, k: int) -> np.ndarray:
    """(queries, k) pool ids by cosine, best first: each rank searches its share, lists merged."""
    out = []
    ids = torch.as_tensor(doc_ids)
    for q0 in range(0, len(queries), QUERY_BLOCK):
        scores, top = topk_search(queries[q0 : q0 + QUERY_BLOCK], docs, ids, k)
        out.append(merge_ranks(scores, top)[1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


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
        from trainer.mining.teacher import score_pairs

        rows, slots = np.nonzero(ids >= 0)
        scores, _ = score_pairs(self.teacher, [texts[q] for q in row_query[rows]], self.data.pool.take(ids[rows, slots]),
                                self.cfg.teacher_batch_size, desc=None)
        out = np.full(ids.shape, np.nan)
        out[rows, slots] = scores
        return out


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
