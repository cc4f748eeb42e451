"""Retrieval metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny import synthetic_pairs, write_beir
from trainer.eval.beir import BeirSet, load_beir
from trainer.eval.evaluate import ranking_metrics



def retrieval_metrics(scores: torch.Tensor, data: BeirSet, k: int = 10) -> dict[str, float]:
    """scores: (queries, corpus), searched by brute force. Mean NDCG@k (graded), recall@k and MRR@k."""
    return ranking_metrics(scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist(), data, k)

def test_metrics_on_a_hand_worked_example():
    data = BeirSet(
        corpus_ids=["a", "b", "c"],
        corpus_texts=["", "", ""],
        query_ids=["q1", "q2"],
        query_texts=["", ""],
        qrels={"q1": {"b": 1}, "q2": {"a": 2, "c": 1}},
    )
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.1, 0.8]])  # q1 ranks a, b, c; q2 ranks c, a, b
    got = retrieval_metrics(scores, data, k=2)
    ndcg_q1 = (1 / math.log2(3)) / 1.0
    ndcg_q2 = (1 / math.log2(2) + 2 / math.log2(3)) / (2 / math.log2(2) + 1 / math.log2(3))
    assert got["ndcg@2"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2)
    assert got["recall@2"] == pytest.approx((1.0 + 1.0) / 2)
    assert got["mrr@2"] == pytest.approx((1 / 2 + 1) / 2)


def test_perfect_scores_give_ones(tmp_path):
    data = load_beir(write_beir(tmp_path / "dev", synthetic_pairs(5)))
    got = retrieval_metrics(torch.eye(5), data)
    assert got == {"ndcg@10": pytest.approx(1.0), "recall@10": pytest.approx(1.0), "mrr@10": pytest.approx(1.0)}


def test_missing_beir_file_is_a_clear_error(tmp_path):
    from trainer.data import DataError

    with pytest.raises(DataError, match="queries.jsonl: no such file"):
        (tmp_path / "corpus.jsonl").write_text("")
        load_beir(tmp_path)


def test_chunked_topk_equals_the_full_matrix():
    from trainer.retrieval.search import topk_search

    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(37, 8, generator=gen, dtype=torch.float64), dim=-1)
    docs = torch.nn.functional.normalize(torch.randn(211, 8, generator=gen, dtype=torch.float64), dim=-1)
    ids = torch.randperm(211, generator=gen) + 1000  # a shard's global ids, in any order
    full = queries @ docs.T
    expected = full.topk(10, dim=1)
    for chunk_elements in (1, 50, 3000, 1 << 24):  # one score at a time .. everything at once
        scores, got = topk_search(queries, docs, ids, 10, chunk_elements=chunk_elements)
        torch.testing.assert_close(scores, expected.values, rtol=0, atol=1e-15)  # BLAS rounds by shape
        assert torch.equal(got, ids[expected.indices])
    scores, got = topk_search(queries, docs[:3], ids[:3], 5)  # fewer documents than k: padded
    assert torch.isinf(scores[:, 3:]).all() and (got[:, 3:] == -1).all()


def test_candidate_scores_equal_brute_force():
    from trainer.retrieval.search import score_candidates, shard_positions

    gen = torch.Generator().manual_seed(1)
    queries, docs = torch.randn(9, 4, generator=gen), torch.randn(30, 4, generator=gen)
    candidates = torch.randint(0, 30, (9, 6), generator=gen)
    candidates[0, 2] = -1
    got = score_candidates(queries, candidates, docs, torch.arange(30), 30, chunk_elements=7)
    expected = torch.einsum("qd,qcd->qc", queries, docs[candidates.clamp(min=0)])
    assert torch.isnan(got[0, 2])
    mask = candidates >= 0
    torch.testing.assert_close(got[mask], expected[mask])
    # A shard holding every other document, in shuffled rows, its positions built once by the
    # caller: the texts it does not hold add 0 (another rank's sum holds them).
    held = torch.randperm(30, generator=gen)[:15]
    positions = shard_positions(held, 30, "cpu")
    assert positions.dtype == torch.int32 and (positions[held] == torch.arange(15, dtype=torch.int32)).all()
    shard = score_candidates(queries, candidates, docs[held], held, 30, chunk_elements=7, positions=positions)
    in_shard = mask & torch.isin(candidates, held)
    torch.testing.assert_close(shard[in_shard], expected[in_shard])
    assert (shard[mask & ~in_shard] == 0).all()


def test_batches_are_the_same_whatever_the_number_of_ranks():
    from trainer.retrieval.search import plan_batches

    texts = [f"{'x' * (i % 17)}" for i in range(100)]
    one, three = plan_batches(texts, 8, 1), plan_batches(texts, 8, 3)
    assert [b.tolist() for b in one.batches] == [b.tolist() for b in three.batches]
    shares = [set(three.rank_indices(r).tolist()) for r in range(3)]
    assert set().union(*shares) == set(range(100)) and sum(map(len, shares)) == 100
    assert max(len(three.rank_batches(r)) for r in range(3)) == three.batches_per_rank == 5


def test_sharded_evaluation_equals_single_process(tmp_path):
    """`python -m trainer.evaluate` on 2 ranks (each embeds and searches half) gives the figures of
    1 rank, and of a brute-force search over the whole score matrix."""
    import json
    import os
    import subprocess
    import sys

    from tests.tiny import REPO, write_tiny_model
    from trainer.eval.evaluate import evaluate
    from trainer.core.embedders import text_embedder
    from trainer.core.model import Encoder
    from trainer.core.tokenizer import load_tokenizer

    model = write_tiny_model(tmp_path / "model")
    data_dir = write_beir(tmp_path / "dev", synthetic_pairs(60, seed=3))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = tmp_path / "eval-2.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.evaluate",
         f"model={model}", f"data={data_dir}", "batch_size=7", f"output={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ndcg@10" in proc.stdout
    sharded = json.loads(out.read_text())
    encoder, tokenizer = Encoder.from_pretrained(str(model)).eval(), load_tokenizer(str(model))
    embed = text_embedder(encoder, tokenizer, "", 128, torch.device("cpu"))
    data = load_beir(data_dir)
    assert sharded == pytest.approx(evaluate(embed, embed, data, batch_size=7), abs=1e-9)
    with torch.no_grad():
        q = torch.nn.functional.normalize(embed(data.query_texts), dim=-1)
        d = torch.nn.functional.normalize(embed(data.corpus_texts), dim=-1)
    assert sharded == pytest.approx(retrieval_metrics(q @ d.T, data), abs=1e-9)
    assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob("*.log"))  # a tool writes only its output
