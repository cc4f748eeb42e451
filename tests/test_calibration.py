"""Calibrated scores: the fits against known models, the judged pairs against a brute-force
search, and `python -m trainer.calibrate` end to end (1 rank = 2 ranks, bad input, the card)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny import (
    REPO, run_trainer, subprocess_env, synthetic_pairs, write_beir, write_jsonl, write_tiny_model,
)
from trainer.eval.calibration import (
    Calibration, brier_score, cross_validated, expected_calibration_error, fit_calibration, load_calibration,
    uncalibrated,
)
from trainer.eval.beir import BeirSet
from trainer.eval.evaluate import EmbeddedSet, judged_pairs
from tests.tiny import read_metadata, run_python_module

SLOPE, INTERCEPT = 9.0, -5.0  # P(relevant) = sigmoid(9 cos - 5): 0.5 at cosine 0.56, as after MNRL training


def logistic_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-0.2, 1.0, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(SLOPE * scores + INTERCEPT)))).astype(np.int64)
    return scores, labels


def test_platt_recovers_the_logistic_model_it_was_drawn_from():
    scores, labels = logistic_sample(20000, seed=0)
    fit = fit_calibration(scores, labels, "platt")
    # The maximum-likelihood estimate is asymptotically normal with covariance the inverse Fisher
    # information X^T W X (W = p(1-p) at the true parameters): each parameter lies within 4 of its
    # standard errors of the truth but for a 6e-5 chance. Swapped labels or a missing intercept
    # miss by tens of standard errors.
    x = np.stack([scores, np.ones_like(scores)], axis=1)
    p = 1 / (1 + np.exp(-(x @ [SLOPE, INTERCEPT])))
    standard_errors = np.sqrt(np.diag(np.linalg.inv(x.T @ (x * (p * (1 - p))[:, None]))))
    assert abs(fit.params["slope"] - SLOPE) < 4 * standard_errors[0]
    assert abs(fit.params["intercept"] - INTERCEPT) < 4 * standard_errors[1]
    # And it is the unpenalised maximum: Newton's method in float64, independently. L-BFGS with
    # tol=1e-10 lands within ~1e-9 of it; a penalty as mild as scikit-learn's default (C=1) moves
    # the parameters by ~1.6e-2 relative, inside the noise above but far outside this bound.
    w = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(x @ w)))
        w += np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]), x.T @ (labels - p))
    np.testing.assert_allclose([fit.params["slope"], fit.params["intercept"]], w, rtol=1e-6)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_lowers_the_error_on_pairs_it_was_not_fitted_on(method):
    fit_scores, fit_labels = logistic_sample(4000, seed=1)
    scores, labels = logistic_sample(4000, seed=2)
    calibration = fit_calibration(fit_scores, fit_labels, method)
    probs = calibration.apply(scores)
    before = expected_calibration_error(uncalibrated(scores), labels)
    after = expected_calibration_error(probs, labels)
    assert after < before / 3  # the raw cosine is off by ~0.2 here (0.5 is reached at 0.56, not 0.5)
    assert brier_score(probs, labels) < brier_score(uncalibrated(scores), labels)
    grid = np.linspace(-1, 1, 101)
    assert np.all(np.diff(calibration.apply(grid)) >= 0)  # a higher cosine never means less relevant


def test_cross_validated_predictions_come_from_fits_that_never_saw_the_query():
    scores, labels = logistic_sample(600, seed=3)
    groups = np.arange(600) // 3  # 200 queries of 3 pairs
    held = cross_validated(scores, labels, groups, "isotonic", folds=4)
    # Isotonic regression reproduces its own training labels almost exactly; out of fold it cannot.
    in_sample = fit_calibration(scores, labels, "isotonic").apply(scores)
    assert brier_score(held, labels) > brier_score(in_sample, labels)
    with pytest.raises(ValueError, match="folds"):
        cross_validated(scores[:6], labels[:6], groups[:6], folds=5)


def test_ece_and_brier_against_hand_computed_values():
    probs, labels = [0.05, 0.15, 0.95, 0.85], [0, 1, 1, 1]
    # Bins: [0.0, 0.1) holds 0.05 (label 0: gap 0.05), [0.1, 0.2) holds 0.15 (label 1: gap 0.85),
    # [0.8, 0.9) and [0.9, 1.0] hold 0.85 and 0.95 (label 1: gaps 0.15 and 0.05).
    assert expected_calibration_error(probs, labels) == pytest.approx((0.05 + 0.85 + 0.15 + 0.05) / 4)
    assert brier_score(probs, labels) == pytest.approx((0.05**2 + 0.85**2 + 0.05**2 + 0.15**2) / 4)


def test_apply_keeps_the_kind_of_its_input_and_the_file_round_trips(tmp_path):
    calibration = Calibration("platt", {"slope": 4.0, "intercept": -2.0}, {"data": "dev"})
    assert calibration.apply(0.5) == pytest.approx(0.5)
    assert isinstance(calibration.apply(np.array([0.1, 0.9])), np.ndarray)
    tensor = calibration.apply(torch.tensor([0.5, 1.0], dtype=torch.float32))
    assert tensor.dtype == torch.float32 and tensor[0].item() == pytest.approx(0.5)
    assert calibration.apply(1e6) == 1.0 and calibration.apply(-1e6) == 0.0  # no overflow warning or NaN
    loaded = load_calibration(calibration.save(tmp_path))
    assert loaded == calibration
    (tmp_path / "calibration.json").write_text('{"method": "magic"}')
    with pytest.raises(ValueError, match="not a calibration file"):
        load_calibration(tmp_path)


def test_judged_pairs_are_the_relevant_and_the_top_ranked_non_relevant_documents():
    gen = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    docs = F.normalize(torch.randn(30, 8, generator=gen), dim=-1)
    data = BeirSet(
        corpus_ids=[f"d{i}" for i in range(30)], corpus_texts=[""] * 30,
        query_ids=[f"q{i}" for i in range(6)], query_texts=[""] * 6,
        qrels={f"q{i}": {f"d{i}": 1, f"d{i + 10}": 2 if i % 2 else 0, "d29": 0} for i in range(6)},
    )
    pairs = judged_pairs(EmbeddedSet(queries, np.arange(30), docs), data)
    full = (queries @ docs.T).double()
    expected_scores, expected_labels = [], []
    for q in range(6):  # brute force: every score, sorted
        relevant = sorted([q] + ([q + 10] if q % 2 else []))
        ranked = [d for d in full[q].argsort(descending=True).tolist() if d not in relevant]
        expected_scores += [full[q, d].item() for d in relevant + ranked[: len(relevant)]]
        expected_labels += [1] * len(relevant) + [0] * len(relevant)
    np.testing.assert_allclose(pairs.scores, expected_scores, rtol=0, atol=1e-6)  # float32 dot products, two orders
    assert pairs.labels.tolist() == expected_labels
    assert pairs.queries.tolist() == [q for q in range(6) for _ in range(4 if q % 2 else 2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model fine-tuned for 8 steps (its folder has a card), and a dev set of 40 queries."""
    root = tmp_path_factory.mktemp("calibrate")
    write_tiny_model(root / "base")
    write_jsonl(root / "train.jsonl", synthetic_pairs(64, seed=1))
    dev = write_beir(root / "dev", synthetic_pairs(40, seed=2))
    run_trainer(root / "run", f"model.name_or_path={root / 'base'}", f"data.train={root / 'train.jsonl'}",
                f"eval.data={dev}", "data.batch_size=16", "trainer.max_steps=8", "trainer.lr=1e-3",
                "wandb.mode=disabled", "trainer.curves=false")
    return {"model": root / "run" / "model", "dev": dev, "root": root}


def calibrate(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """`python -m trainer.calibrate args` (under torchrun with nproc > 1; else forked from the
    session's warm interpreter)."""
    if nproc == 1:
        return run_python_module("trainer.calibrate", list(args), cwd=REPO, env=subprocess_env(), timeout=300)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, "-m", "trainer.calibrate", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def test_calibrate_writes_the_fit_its_picture_and_the_card_and_two_ranks_fit_as_one(trained, tmp_path):
    model, dev = trained["model"], trained["dev"]
    one = calibrate(f"model={model}", f"data={dev}", "folds=4")
    assert one.returncode == 0, one.stderr[-3000:]
    record = json.loads((model / "calibration.json").read_text())
    assert record["method"] == "platt" and record["pairs"] == 80 and record["queries"] == 40
    assert record["ece_after"] < record["ece_before"]
    assert f"ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}" in one.stdout
    assert (model / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (model / "README.md").read_text()
    assert f"ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}" in card and "load_calibration" in card
    read_metadata(model / "README.md")  # the rewrite left the metadata block whole

    two = calibrate(f"model={model}", f"data={dev}", "folds=4", f"calibration_dir={tmp_path}", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    sharded = json.loads((tmp_path / "calibration.json").read_text())
    # The pairs' cosines are bit-identical over any number of ranks (the same batches, one dot
    # product per pair), so the fits are too; the tolerance only allows for the solver's rounding.
    for key in ("slope", "intercept"):
        assert sharded["params"][key] == pytest.approx(record["params"][key], rel=1e-9)
    assert sharded["ece_after"] == pytest.approx(record["ece_after"], rel=1e-9)

    evaluated = run_python_module("trainer.evaluate", [f"model={model}", f"data={dev}"], cwd=REPO, env=subprocess_env(),
                                  timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    ece = float(evaluated.stdout.split("ece ")[1].split()[0])
    # evaluate scores the in-sample fit (every pair was fitted on), which is no worse than out of fold.
    assert ece <= record["ece_before"]


def test_bad_input_is_one_clear_line(trained, tmp_path):
    empty = tmp_path / "empty-qrels"
    write_beir(empty, synthetic_pairs(4, seed=3))
    (empty / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    cases = [
        ((f"model={trained['model']}", f"data={empty}"), "no judged queries"),
        ((f"model={trained['root']}", f"data={trained['dev']}"), "no model in this folder (config.json missing)"),
        ((f"model={trained['model']}", f"data={trained['dev']}", "check_split=dev"), "qrels/dev.tsv: no such file"),
    ]
    for args, message in cases:
        proc = calibrate(*args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
