"""Teacher scores (trainer/mining/teacher.py, `python -m trainer.score`, `trainer.mine teacher=PATH`): equal
to a direct call of the model on each pair, 2 ranks equal to 1, the teacher filter, bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import BertConfig, BertForSequenceClassification

from tests.test_mine import assets, compose_mine, mine_args, read_jsonl  # noqa: F401 (assets is a fixture)
from tests.tiny import REPO, WORDS, run_python_module, subprocess_env, synthetic_pairs, word_tokenizer, write_jsonl
from trainer.tools import configs
from trainer.mining.miner import mine
from trainer.tools.score import score


def write_cross_encoder(folder):
    """A tiny random BERT cross-encoder with one output (what a reranker folder holds)."""
    folder.mkdir(parents=True, exist_ok=True)
    word_tokenizer().save_pretrained(folder)
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    rows = synthetic_pairs(30, seed=6)
    for i, row in enumerate(rows):
        row["negatives"] = [rows[(i + k) % 30]["positive"] for k in range(1, 1 + i % 4)]  # 0 to 3 each
    rows[4]["scores"] = [9.0]  # stale scores: replaced
    return {"root": root, "rows": rows, "input": write_jsonl(root / "mined.jsonl", rows),
            "teacher": write_cross_encoder(root / "cross-encoder")}


def compose_score(*overrides: str):
    configs.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf" / "tools")):
        return compose(config_name="score", overrides=list(overrides))


def direct_logits(folder, pairs: list[tuple[str, str]]) -> np.ndarray:
    """The cross-encoder called on one pair at a time: no batch, no padding."""
    from transformers import AutoTokenizer

    model = BertForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return np.array([float(model(**tokenizer(q, d, return_tensors="pt")).logits[0, 0]) for q, d in pairs])


def test_scores_are_the_cross_encoders_logits_of_each_pair(scoring, tmp_path):
    output = tmp_path / "scored.jsonl"
    summary = score(compose_score(f"input={scoring['input']}", f"output={output}", f"teacher={scoring['teacher']}",
                                  "teacher_batch_size=4"))
    scored = read_jsonl(output)
    assert summary["teacher_kind"] == "cross_encoder" and summary["pairs"] == sum(1 + len(r["negatives"]) for r in scoring["rows"])
    pairs = [(r["query"], d) for r in scoring["rows"] for d in [r["positive"], *r["negatives"]]]
    flat = np.array([s for r in scored for s in r["scores"]])
    # Batched with padding vs one pair alone: fp32 sums in other orders, logits of order 1;
    # the output is rounded to 6 decimals.
    np.testing.assert_allclose(flat, direct_logits(scoring["teacher"], pairs), atol=1e-5)
    for row, out in zip(scoring["rows"], scored):
        assert len(out["scores"]) == 1 + len(row["negatives"])
        assert {k: v for k, v in out.items() if k != "scores"} == {k: v for k, v in row.items() if k != "scores"}


def test_a_bi_encoder_teacher_scores_cosines(scoring, tmp_path):
    from tests.tiny import write_tiny_model
    from trainer.core.embedders import text_embedder
    from trainer.core.model import Encoder
    from trainer.core.tokenizer import load_tokenizer

    embedder = write_tiny_model(tmp_path / "embedder")
    output = tmp_path / "scored.jsonl"
    summary = score(compose_score(f"input={scoring['input']}", f"output={output}", f"teacher={embedder}"))
    assert summary["teacher_kind"] == "bi_encoder"
    encoder, tokenizer = Encoder.from_pretrained(str(embedder)).eval(), load_tokenizer(str(embedder))
    embed = text_embedder(encoder, tokenizer, "", 512, torch.device("cpu"))
    row = scoring["rows"][3]
    with torch.no_grad():
        q, docs = embed([row["query"]]), embed([row["positive"], *row["negatives"]])
    expected = torch.nn.functional.cosine_similarity(q, docs).numpy()
    np.testing.assert_allclose(read_jsonl(output)[3]["scores"], expected, atol=1e-5)


def test_two_ranks_score_what_one_rank_scores(scoring, tmp_path):
    outputs = {}
    for nproc in (1, 2):
        output = tmp_path / f"scored-{nproc}.jsonl"
        args = [f"input={scoring['input']}", f"output={output}", f"teacher={scoring['teacher']}", "teacher_batch_size=3"]
        if nproc == 1:
            proc = run_python_module("trainer.score", args, cwd=tmp_path, env=subprocess_env(), timeout=300)
        else:
            import subprocess

            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                   "-m", "trainer.score", *args], cwd=tmp_path, env=subprocess_env(),
                                  capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "pairs/s" in proc.stdout
        outputs[nproc] = read_jsonl(output)
    # Each pair lands in the same batch (same companions, same padding) whatever the ranks: equal.
    assert outputs[1] == outputs[2]


def test_bad_scoring_input_is_refused_and_nothing_is_written(scoring, tmp_path):
    from trainer.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "w1", "positive": "w2", "negatives": ["w3"]}\n{"query": "w4", "positive": "w5", "negatives": [7]}\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2: field 'negatives\\[0\\]' must be a string"):
        score(compose_score(f"input={bad}", f"output={tmp_path / 'out.jsonl'}", f"teacher={scoring['teacher']}"))
    with pytest.raises(ValueError, match="teacher is missing"):
        score(compose_score(f"input={scoring['input']}", f"output={tmp_path / 'out.jsonl'}"))
    with pytest.raises(ValueError, match="no such model folder"):
        score(compose_score(f"input={scoring['input']}", f"output={tmp_path / 'out.jsonl'}", f"teacher={tmp_path / 'none'}"))
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.tmp").exists()


# ------------------------------------------------------------------------ mining with a teacher


def test_mining_with_a_teacher_scores_the_output_and_can_filter_by_it(assets, scoring, tmp_path):
    plain, judged = tmp_path / "plain.jsonl", tmp_path / "judged.jsonl"
    common = ["retriever=bm25", "max_score_ratio=null", f"teacher={scoring['teacher']}"]
    mine(compose_mine(*mine_args(assets, plain, *common)))
    summary = mine(compose_mine(*mine_args(assets, judged, *common, "filter_by=teacher", "margin=0.0")))
    for row in read_jsonl(plain) + read_jsonl(judged):
        assert len(row["scores"]) == 1 + len(row["negatives"]) == 4
        direct = direct_logits(scoring["teacher"], [(row["query"], d) for d in [row["positive"], *row["negatives"]]])
        np.testing.assert_allclose(row["scores"], direct, atol=1e-5)  # as above: batched vs alone
    # margin 0 by the teacher: no kept negative scores above its row's positive, and some were dropped.
    assert all(max(r["scores"][1:]) <= r["scores"][0] + 1e-6 for r in read_jsonl(judged))
    assert summary["dropped_by_filter"] > 0
    assert any(max(r["scores"][1:]) > r["scores"][0] for r in read_jsonl(plain))  # the student's filter kept such
    with pytest.raises(ValueError, match="filter_by=teacher needs teacher"):
        mine(compose_mine(*mine_args(assets, tmp_path / "x.jsonl", "filter_by=teacher")))
