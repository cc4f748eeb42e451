"""Approximate dense search (FAISS), for pools beyond what exact search serves in reasonable time.

Each rank indexes its own shard of the pool's embeddings with a FAISS index built from a factory
string (`HNSW32`, `IVF4096,Flat`, `IVF4096,PQ32`, ...; inner product on normalised vectors, i.e.
cosine), and searches it; the shards' lists are merged exactly as exact search's are. Only the
retrieval is approximate: the filter scores every candidate exactly. FAISS is an optional extra
(`pip install faiss-cpu`, or faiss-gpu); exact search stays the default.
"""

from __future__ import annotations

import numpy as np
import torch


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ValueError("search=faiss needs FAISS: pip install faiss-cpu (or the project's [faiss] extra)") from None
    return faiss


class ShardANN:
    """A FAISS index over this rank's shard (embeddings docs, pool ids doc_ids)."""

    def __init__(self, docs: torch.Tensor, doc_ids: np.ndarray, factory: str, nprobe: int, ef_search: int) -> None:
        faiss = _faiss()
        faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.index = None
        if len(docs) == 0:
            return
        vectors = np.ascontiguousarray(docs.float().cpu().numpy())
        try:
            self.index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
            if not self.index.is_trained:  # IVF / PQ: k-means on the shard, seeded by FAISS (deterministic)
                self.index.train(vectors)
        except RuntimeError as err:
            raise ValueError(f"faiss_index={factory}: {str(err).strip().splitlines()[-1]} "
                             f"(a shard of {len(vectors)} vectors)") from None
        self.index.add(vectors)
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
            try:  # each applies to the index kinds that have it (IVF: nprobe, HNSW: efSearch)
                space.set_index_parameter(self.index, name, value)
            except RuntimeError:
                pass

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, pool ids), each (queries, k), best first; missing entries are (-inf, -1)."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if self.index is not None and len(queries):
            found, local = self.index.search(np.ascontiguousarray(queries.float().cpu().numpy()), k)
            ok = local >= 0
            scores[ok], ids[ok] = found[ok], self.doc_ids[local[ok]]
        return torch.from_numpy(scores), torch.from_numpy(ids)


def recall(approximate: np.ndarray, exact: np.ndarray) -> tuple[int, int]:
    """(how many of the exact lists' ids the approximate lists hold, how many there are), rows of
    pool ids with -1 for none."""
    hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approximate, exact))
    return hits, int((exact >= 0).sum())
