"""BM25 over a candidate pool shared out over ranks: exact, and fast (bm25s).

- Each rank tokenises and indexes only its share of the pool. BM25's statistics of the corpus
  (the number of texts, their mean length, each term's document frequency) are summed over the
  ranks first, so every text scores as in one index over the whole pool, bit for bit.
- Retrieval runs on bm25s's numba backend with threads (bench/bm25_speed.py: over 100x its numpy
  backend's queries/s) or its numpy backend; both add a text's term scores in the query's token
  order, so their scores are identical too.
- Lists rank by score, then by the lower pool id: one order whatever the backend or the number
  of ranks, where bm25s's own order among equal scores is arbitrary. Each rank fetches SLACK more
  than k; a query whose last fetched score still equals its k-th is ranked again from its full
  score vector, so ties at the cut are settled exactly too.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch

from trainer.core import distributed
from trainer.core.memory import release_freed_memory
from trainer.retrieval.bm25_matrix import score_matrix
from trainer.retrieval.search import merge_ranks

SLACK = 16  # extra candidates fetched per shard, so that ties at the cut rarely need a second look
NUMBA_FROM_QUERIES = 2000  # auto: numba's compilation (~5 s) pays for itself from about this many queries


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


TOKENIZE_CHUNK = 50000  # texts tokenised at a time: bounds the Python lists of tokens alive at once


class ShardTokens:
    """A shard's texts as term ids: one flat int32 array, each text's span of it, the vocabulary.
    Python lists of tokens cost about 100 bytes a token and, freed, leave the process's memory
    fragmented; these arrays cost 4 bytes a token."""

    def __init__(self, chunks) -> None:
        vocab: dict[str, int] = {}
        flats, lengths, freqs = [], [], np.zeros(0, dtype=np.int64)
        for texts in chunks:
            docs = tokenize(texts)
            flat, length = _term_ids(docs, vocab)
            freqs = np.pad(freqs, (0, len(vocab) - len(freqs))) + _doc_freqs(flat, length, len(vocab))
            flats.append(flat)
            lengths.append(length)
            del docs
        self.vocab = vocab
        self.flat = np.concatenate(flats) if flats else np.zeros(0, dtype=np.int32)
        self.offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]) if lengths else np.zeros(1, np.int64)
        self.freqs = freqs
        release_freed_memory()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc_freqs(self) -> np.ndarray:
        """Per term id, how many of the texts hold it."""
        return self.freqs


def _term_ids(docs: list[list[str]], vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(flat int32 term ids, per-text lengths) of tokenised texts; new terms join vocab. pandas'
    factorize maps each distinct term once: a Python int made per token and kept by the
    vocabulary would pin the allocator's pages among the chunk's garbage (~400 MB at 1M texts)."""
    import pandas as pd

    tokens = np.empty(sum(len(doc) for doc in docs), dtype=object)
    tokens[:] = [t for doc in docs for t in doc]
    codes, terms = pd.factorize(tokens)
    ids = np.fromiter((vocab.setdefault(t, len(vocab)) for t in terms), dtype=np.int32, count=len(terms))
    return ids[codes] if len(codes) else np.zeros(0, np.int32), np.fromiter(map(len, docs), np.int64, len(docs))


def _doc_freqs(flat: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    """Per term id, how many of these texts (term ids flat, lengths) hold it (a chunk at a time)."""
    size = max(vocab_size, 1)
    text = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    return np.bincount(np.unique(text * size + flat) % size, minlength=vocab_size)


def shard_tokens(texts: Sequence[str]) -> ShardTokens:
    return ShardTokens(texts[i : i + TOKENIZE_CHUNK] for i in range(0, len(texts), TOKENIZE_CHUNK))


@dataclass(frozen=True)
class PoolStats:
    """BM25's corpus statistics of the whole pool."""

    n_docs: int
    mean_length: np.float64
    doc_freqs: dict[str, int]


def pool_stats(tokens: ShardTokens) -> PoolStats:
    """The pool's statistics from every rank's share (a collective)."""
    local = (len(tokens), int(tokens.offsets[-1]), dict(zip(tokens.vocab, tokens.doc_freqs().tolist())))
    parts = distributed.all_gather_object(local) if distributed.world_size() > 1 else [local]
    n_docs, total = sum(p[0] for p in parts), sum(p[1] for p in parts)
    freqs: Counter = Counter()
    for part in parts:
        freqs.update(part[2])
    # An exact integer sum divided once: the value bm25s gets from np.mean over the whole pool, and
    # its type, np.float64, which makes numpy compute the term weights in float64 as bm25s does.
    return PoolStats(n_docs, np.float64(total / max(n_docs, 1)), dict(freqs))


def _shard_bm25_class():
    import bm25s
    from bm25s.scoring import _build_idf_array, _select_idf_scorer, _select_tfc_scorer

    class ShardBM25(bm25s.BM25):
        """bm25s's BM25 over one shard, its scores computed with the whole pool's statistics."""

        def __init__(self, stats: PoolStats, **kwargs) -> None:
            super().__init__(**kwargs)
            if self.method in self.methods_requiring_nonoccurrence:
                raise ValueError(f"BM25 method {self.method} is not supported over a sharded pool")
            self.stats = stats

        def index_shard(self, tokens: ShardTokens) -> None:
            vocab = dict(tokens.vocab)
            self.pool_freqs = {i: self.stats.doc_freqs[term] for term, i in vocab.items()}
            # bm25s's "object" form (ids, vocab): its tuple form insists on a list of lists.
            self.index(SimpleNamespace(ids=tokens, vocab=vocab), show_progress=False)
            # Retrieval needs neither: a dictionary per term (~100 MB per million terms) and the statistics.
            del self.pool_freqs
            self.stats = None

        def build_index_from_ids(self, unique_token_ids, corpus_token_ids, show_progress=True, leave_progress=False):
            # bm25s's extension point, with the pool's N, mean length and document frequencies in
            # place of the shard's, and the score matrix built a chunk of texts at a time.
            self.nonoccurrence_array = None  # the Lucene and Robertson variants have none
            idf = _build_idf_array(doc_frequencies=self.pool_freqs, n_docs=self.stats.n_docs,
                                   compute_idf_fn=_select_idf_scorer(self.idf_method), dtype=self.dtype)
            tfc = partial(_select_tfc_scorer(self.method), l_avg=self.stats.mean_length, k1=self.k1, b=self.b,
                          delta=self.delta)
            tokens = corpus_token_ids
            return score_matrix(tokens.flat, tokens.offsets, tokens.doc_freqs(), idf, tfc, self.dtype, self.int_dtype)

    return ShardBM25


def choose_backend(name: str, queries: int) -> str:
    """numpy or numba: auto takes numba when it is installed and there are enough queries."""
    available = importlib.util.find_spec("numba") is not None
    if name == "numba" and not available:
        raise ValueError("bm25_backend=numba needs numba: pip install numba")
    if name == "auto":
        return "numba" if available and queries >= NUMBA_FROM_QUERIES else "numpy"
    return name


class ShardIndex:
    """This rank's share of the pool, its texts first_id, first_id + 1, ..., indexed with the pool's
    statistics. A share is contiguous, so its pool ids are an offset (an array of them would hold
    8 bytes a text for the whole run)."""

    def __init__(self, shard_texts: Sequence[str] | ShardTokens, first_id: int = 0, backend: str = "numpy",
                 threads: int = 1, stats: PoolStats | None = None) -> None:
        tokens = shard_texts if isinstance(shard_texts, ShardTokens) else shard_tokens(shard_texts)
        stats = stats or pool_stats(tokens)  # a collective: every rank builds its index at once
        self.first_id, self.size = int(first_id), len(tokens)
        self.threads = threads
        self.retriever = None
        if len(tokens):
            self.retriever = _shard_bm25_class()(stats, backend=backend)
            self.retriever.index_shard(tokens)
        release_freed_memory()

    def search(self, query_tokens: list[list[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32, pool ids) each (queries, k), best first by (score, lower id); score 0
        (no shared term) and missing entries are (-inf, -1)."""
        scores = np.full((len(query_tokens), k), -np.inf, dtype=np.float32)
        ids = np.full((len(query_tokens), k), -1, dtype=np.int64)
        if self.retriever is None:
            return scores, ids
        vocab = self.retriever.vocab_dict
        known = np.array([i for i, q in enumerate(query_tokens) if any(t in vocab for t in q)], dtype=np.int64)
        if len(known) == 0:
            return scores, ids
        fetch = min(k + SLACK, self.size)
        local, found = self.retriever.retrieve([query_tokens[i] for i in known], k=fetch, n_threads=self.threads,
                                               show_progress=False)
        local, found = np.asarray(local, dtype=np.int64), np.asarray(found, dtype=np.float32)
        top_scores, top_ids = _canonical(found, local + self.first_id, k)
        if fetch < self.size:  # rows whose ties may reach past what was fetched: ranked in full
            unsure = np.flatnonzero((found.min(axis=1) == top_scores[:, -1]) & (top_scores[:, -1] > 0))
            for row in unsure:
                full = self.retriever.get_scores(query_tokens[known[row]]).astype(np.float32)
                tied = np.flatnonzero(full >= top_scores[row, -1])  # every text that can make the top k
                top_scores[row], top_ids[row] = (x[0] for x in _canonical(full[tied][None], tied[None] + self.first_id, k))
        positive = top_scores > 0
        scores[known] = np.where(positive, top_scores, -np.inf)
        ids[known] = np.where(positive, top_ids, -1)
        return scores, ids


def _canonical(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best by score, ties to the lower id (rows of candidates with their ids)."""
    ids = np.broadcast_to(ids, scores.shape)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    top_scores, top_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    if top_scores.shape[1] < k:
        pad = ((0, 0), (0, k - top_scores.shape[1]))
        top_scores, top_ids = np.pad(top_scores, pad, constant_values=-np.inf), np.pad(top_ids, pad, constant_values=-1)
    return top_scores, top_ids


def shard_index(pool: Sequence[str], backend: str = "auto", queries: int = 0) -> ShardIndex:
    """This rank's index over a contiguous share of the pool (a list, or a TextStore: then only
    the share is read), with the whole pool's statistics (a collective). queries: how many will be
    searched, for backend=auto."""
    world, rank = distributed.world_size(), distributed.rank()
    bounds = np.linspace(0, len(pool), world + 1).astype(np.int64)
    first, end = int(bounds[rank]), int(bounds[rank + 1])
    read = pool.take if hasattr(pool, "take") else (lambda ids: [pool[i] for i in ids])
    tokens = ShardTokens(read(np.arange(i, min(i + TOKENIZE_CHUNK, end))) for i in range(first, end, TOKENIZE_CHUNK))
    return ShardIndex(tokens, first, choose_backend(backend, queries), threads=max(1, torch.get_num_threads()))


def ranked_lists(index: ShardIndex, queries: Sequence[str], k: int) -> np.ndarray:
    """(queries, k) pool ids by BM25, best first (-1 where no more text shares a term with the
    query): every rank searches its shard, and the shards' lists are merged exactly (a collective)."""
    scores, ids = index.search(tokenize(queries), k)
    return merge_ranks(torch.from_numpy(scores), torch.from_numpy(ids))[1].numpy()
