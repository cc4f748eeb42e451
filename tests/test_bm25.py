"""BM25 over a sharded pool (trainer/retrieval/bm25.py) against one bm25s index over the whole pool, brute
force: the same scores bit for bit, and lists ranked by (score, lower id) whatever the shards,
the backend or the ties at the cut."""

from __future__ import annotations

import random

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from trainer.retrieval.bm25 import ShardIndex, _canonical, pool_stats, ranked_lists, shard_index, shard_tokens, tokenize
from trainer.retrieval.search import merge_ranks

WORDS = [f"term{i}" for i in range(40)]


def bm25_lists(queries: Sequence[str], pool: Sequence[str], k: int, backend: str = "auto",
               query_block: int = 8192) -> np.ndarray:
    """The miner's use of the index: ranked_lists for every query, a block of queries at a time, over shard_index(pool)."""
    index = shard_index(pool, backend, len(queries))
    out = [ranked_lists(index, queries[q0 : q0 + query_block], k) for q0 in range(0, len(queries), query_block)]
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def texts(count: int, seed: int, words: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, words))) for _ in range(count)]


def brute_force(pool: list[str], queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pool text scored by plain bm25s over the whole pool, ranked by (score, lower id)."""
    import bm25s

    index = bm25s.BM25()
    index.index(bm25s.tokenize(pool, stopwords="en", show_progress=False), show_progress=False)
    scores = np.stack([index.get_scores(q).astype(np.float32) if any(t in index.vocab_dict for t in q)
                       else np.zeros(len(pool), np.float32) for q in tokenize(queries)])
    top_scores, top_ids = _canonical(scores, np.arange(len(pool))[None], k)
    return np.where(top_scores > 0, top_scores, -np.inf), np.where(top_scores > 0, top_ids, -1)


def test_shards_with_the_pools_statistics_score_as_one_index_and_merge_exactly():
    # A rare term (one hit, then none) and a query with no known term (no hit at all) as well.
    pool, queries = texts(299, seed=0) + ["rare term2"], texts(50, seed=1, words=3) + ["rare", "unheard"]
    expected_scores, expected_ids = brute_force(pool, queries, k=20)
    stats = pool_stats(shard_tokens(pool))  # one process: the whole pool's
    bounds = [0, 97, 210, 300]
    shards = [ShardIndex(pool[a:b], a, stats=stats) for a, b in zip(bounds, bounds[1:])]
    results = [shard.search(tokenize(queries), 20) for shard in shards]
    # What merge_ranks does over ranks: every shard's list side by side, the best 20 by (score, id).
    scores = torch.from_numpy(np.concatenate([r[0] for r in results], axis=1))
    ids = torch.from_numpy(np.concatenate([r[1] for r in results], axis=1))
    from trainer.retrieval.search import _best

    merged_scores, merged_ids = _best(scores, ids, 20)
    np.testing.assert_array_equal(merged_ids.numpy(), expected_ids)
    np.testing.assert_array_equal(merged_scores.numpy(), expected_scores)  # bit for bit: the same float32 sums
    one_index = ShardIndex(pool).search(tokenize(queries), 20)
    np.testing.assert_array_equal(one_index[1], expected_ids)
    assert (expected_ids[:, -1] >= 0).any()  # full lists, a list of one, an empty list
    assert expected_ids[-2].tolist() == [299] + [-1] * 19 and expected_ids[-1].tolist() == [-1] * 20


def test_ties_at_the_cut_go_to_the_lower_ids():
    # 60 texts with the same terms (stop words differ, and are dropped): 60 equal scores, k 10.
    pool = [f"alpha beta {'the ' * (i % 3)}a" for i in range(60)] + texts(40, seed=2)
    scores, ids = ShardIndex(pool).search(tokenize(["alpha"]), 10)
    assert ids[0].tolist() == list(range(10)) and len(set(scores[0].tolist())) == 1


def test_numba_backend_ranks_as_numpy():
    pytest.importorskip("numba")
    pool, queries = texts(400, seed=3), texts(30, seed=4, words=3)
    numpy_lists = ShardIndex(pool, backend="numpy").search(tokenize(queries), 25)
    numba_lists = ShardIndex(pool, backend="numba", threads=2).search(tokenize(queries), 25)
    np.testing.assert_array_equal(numba_lists[1], numpy_lists[1])
    np.testing.assert_array_equal(numba_lists[0], numpy_lists[0])


def test_bm25_lists_of_one_process_equal_brute_force_in_blocks():
    pool, queries = texts(200, seed=5), texts(70, seed=6, words=3)
    _, expected = brute_force(pool, queries, k=15)
    np.testing.assert_array_equal(bm25_lists(queries, pool, 15, backend="numpy", query_block=16), expected)
    _, merged = merge_ranks(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64))  # one rank: as given
    assert merged.shape == (2, 3)


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire"])
def test_chunked_score_matrix_equals_bm25s_own_index_bit_for_bit(method, monkeypatch):
    """The score matrix built a chunk of texts at a time (trainer/retrieval/bm25_matrix.py; chunks of 7 texts,
    so a chunk ends mid-column) against plain bm25s indexing the whole pool itself: every term's
    column holds the same texts in the same order with the same float32 scores."""
    import bm25s

    from trainer.retrieval import bm25_matrix
    from trainer.retrieval.bm25 import _shard_bm25_class

    monkeypatch.setattr(bm25_matrix, "CHUNK_TEXTS", 7)
    pool = texts(120, seed=7) + ["", "the a"]  # texts without a term (empty, all stop words) too
    tokens = shard_tokens(pool)
    ours = _shard_bm25_class()(pool_stats(tokens), method=method)
    ours.index_shard(tokens)
    plain = bm25s.BM25(method=method)
    plain.index(bm25s.tokenize(pool, stopwords="en", show_progress=False), show_progress=False)
    terms = [t for t in plain.vocab_dict if t]
    assert sorted(terms) == sorted(t for t in ours.vocab_dict if t)
    for term in terms:
        column = [index.scores["indptr"][index.vocab_dict[term] + j] for index in (ours, plain) for j in (0, 1)]
        ours_slice, plain_slice = slice(*column[:2]), slice(*column[2:])
        np.testing.assert_array_equal(ours.scores["indices"][ours_slice], plain.scores["indices"][plain_slice])
        np.testing.assert_array_equal(ours.scores["data"][ours_slice], plain.scores["data"][plain_slice])
    assert len(ours.scores["data"]) == len(plain.scores["data"]) and ours.scores["data"].dtype == np.float32
