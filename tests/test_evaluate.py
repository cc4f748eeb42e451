"""Retrieval metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny import synthetic_pairs, write_beir
from trainer.evaluate import BeirSet, load_beir, retrieval_metrics


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
