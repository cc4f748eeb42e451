"""Distillation (trainer/core/distill.py, ContrastiveLoss(distill=...)): against sentence-transformers'
DistillKLDivLoss and MarginMSELoss on the same embeddings and scores, against a float64 brute
force, through GradCache, and in the trainer (2 ranks, ZeRO-2, resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.reference import reference_loss
from tests.test_gradcache import BATCH, CHUNK, NEGATIVES, assert_same_grads, batches, grads_of, in_chunks
from tests.tiny import rounding_atol, run_trainer, synthetic_pairs, tiny_encoder, write_jsonl, write_tiny_model
from trainer.core.gradcache import GradCache
from trainer.core.losses import PRESETS, ContrastiveLoss

B, N, D = 6, 3, 16  # rows, hard negatives, embedding size


def inputs(seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=gen, dtype=dtype)
    docs = torch.randn(B, 1 + N, D, generator=gen, dtype=dtype)
    teacher = torch.randn(B, 1 + N, generator=gen, dtype=dtype) * 3
    return q.requires_grad_(), docs.requires_grad_(), teacher


def distill_only(method: str, **kwargs) -> ContrastiveLoss:
    return ContrastiveLoss(distill=method, contrastive_weight=0.0, **kwargs)


# --------------------------------------------------------------- sentence-transformers' losses


@pytest.mark.parametrize("tau, teacher_tau", [(0.05, 1.0), (0.1, 2.5)])
def test_kl_equals_sentence_transformers_distill_kl_div_loss(tau, teacher_tau):
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss
    from sentence_transformers.util import pairwise_cos_sim

    q, docs, teacher = inputs()
    ours = distill_only("kl", temperature=tau, teacher_temperature=teacher_tau)(q, docs, teacher_scores=teacher)
    ours.backward()
    expected_grads = q.grad.clone(), docs.grad.clone()
    q.grad = docs.grad = None
    st = DistillKLDivLoss(None, similarity_fct=pairwise_cos_sim, student_temperature=tau, teacher_temperature=teacher_tau)
    theirs = st.compute_loss_from_embeddings([q] + [docs[:, j] for j in range(1 + N)], teacher)
    # sentence-transformers multiplies by student_temperature ** 2 (Hinton's gradient scaling); ours
    # is the plain KL, which distill_weight scales (see distill.py).
    theirs = theirs / tau**2
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(expected_grads[0], q.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(expected_grads[1], docs.grad, atol=1e-12, rtol=1e-10)


def test_margin_mse_equals_sentence_transformers_margin_mse_loss():
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss
    from sentence_transformers.util import pairwise_cos_sim

    q, docs, teacher = inputs(1)
    ours = distill_only("margin_mse")(q, docs, teacher_scores=teacher)
    ours.backward()
    expected_grads = q.grad.clone(), docs.grad.clone()
    q.grad = docs.grad = None
    theirs = MarginMSELoss(None, similarity_fct=pairwise_cos_sim).compute_loss_from_embeddings(
        [q] + [docs[:, j] for j in range(1 + N)], teacher)
    theirs.backward()
    # float64 on both sides, a few operations apart: equal to a few ulps.
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(expected_grads[0], q.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(expected_grads[1], docs.grad, atol=1e-12, rtol=1e-10)


# -------------------------------------------------------------------- float64 brute force


def brute_distill(q, docs, teacher, method, tau, teacher_tau) -> float:
    """One row and one document at a time, from the definitions, skipping nan scores."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        cos = [float(qi @ (d / d.norm())) for d in docs[i]]
        kept = [j for j in range(len(cos)) if not math.isnan(float(teacher[i, j]))]
        if method == "kl":
            zt = sum(math.exp(float(teacher[i, j]) / teacher_tau) for j in kept)
            zs = sum(math.exp(cos[j] / tau) for j in kept)
            for j in kept:
                p = math.exp(float(teacher[i, j]) / teacher_tau) / zt
                total += p * (math.log(p) - math.log(math.exp(cos[j] / tau) / zs)) / q.shape[0]
        else:
            pairs = [j for j in kept if j > 0] if 0 in kept else []
            errors = [((cos[0] - cos[j]) - (float(teacher[i, 0]) - float(teacher[i, j]))) ** 2 for j in pairs]
            total += (sum(errors) / max(len(errors), 1)) / q.shape[0]
    return total


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("method", ["kl", "margin_mse"])
@pytest.mark.parametrize("tile", [None, 4])
def test_the_combined_loss_equals_a_float64_brute_force(preset, method, tile):
    q, docs, teacher = inputs(2)
    teacher[1, 2] = float("nan")  # a padded slot: no teacher score
    directions, partition = PRESETS[preset]
    loss = ContrastiveLoss.from_preset(preset, temperature=0.07, tile_size=tile, distill=method, distill_weight=0.7,
                                       contrastive_weight=1.3, teacher_temperature=2.0)
    got = loss(q, docs, teacher_scores=teacher)
    contrastive = reference_loss(q.detach(), docs.detach(), 0.07, directions, partition)
    expected = 1.3 * contrastive + 0.7 * brute_distill(q.detach(), docs.detach(), teacher, method, 0.07, 2.0)
    assert abs(float(got.detach()) - expected) < 1e-9  # float64 throughout: differences are rounding
    parts = loss.last_parts
    assert abs(float(parts["contrastive"]) - contrastive) < 1e-9
    assert -1 <= float(parts["rank_agreement"]) <= 1


def test_matryoshka_distils_at_every_size():
    q, docs, teacher = inputs(3)
    loss = ContrastiveLoss(matryoshka_dims=[16, 8], matryoshka_weights=[1.0, 0.5], distill="margin_mse")
    got = loss(q, docs, teacher_scores=teacher).detach()
    expected = sum(
        w * (reference_loss(q.detach()[:, :dim], docs.detach()[:, :, :dim], 0.05, ("query_to_doc",), "joint")
             + brute_distill(q.detach()[:, :dim], docs.detach()[:, :, :dim], teacher, "margin_mse", 0.05, 1.0))
        for dim, w in [(16, 1.0), (8, 0.5)]
    )
    assert abs(float(got) - expected) < 1e-9


def test_rank_agreement_is_spearman():
    from scipy.stats import spearmanr

    q, docs, teacher = inputs(4)
    cos = torch.nn.functional.cosine_similarity(q[:, None], docs, dim=-1).detach()
    loss = distill_only("kl")
    loss(q, docs, teacher_scores=teacher)
    expected = sum(spearmanr(cos[i].numpy(), teacher[i].numpy()).statistic for i in range(B)) / B
    assert abs(float(loss.last_parts["rank_agreement"]) - expected) < 1e-9
    loss(q, docs, teacher_scores=cos * 7)  # a teacher that orders every group as the student does
    assert abs(float(loss.last_parts["rank_agreement"]) - 1.0) < 1e-12


def test_bad_distillation_settings_are_clear_errors():
    q, docs, teacher = inputs()
    with pytest.raises(ValueError, match="needs teacher_scores"):
        distill_only("kl")(q, docs)
    with pytest.raises(ValueError, match="do not match docs"):
        distill_only("kl")(q, docs, teacher_scores=teacher[:, :2])
    with pytest.raises(ValueError, match="distill must be one of"):
        ContrastiveLoss(distill="mse")
    with pytest.raises(ValueError, match="not both 0"):
        ContrastiveLoss(distill="kl", distill_weight=0, contrastive_weight=0)


# ----------------------------------------------------------------------------- GradCache


@pytest.mark.parametrize("method", ["kl", "margin_mse"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_cached_step_with_distillation_equals_one_backward_through_the_batch(method, dropout):
    """Without dropout the reference is one plain step; with it, the same chunks forwarded in one
    autograd graph after the same seed (the masks pass 2 must replay). fp32 on both sides, matmuls
    of other shapes: 1e-5 (gradients of order 1e-1, fp32 rounding of sums of ~100 terms)."""
    queries, docs = batches()
    teacher = torch.randn(BATCH, 1 + NEGATIVES, generator=torch.Generator().manual_seed(5)) * 3
    loss_fn = ContrastiveLoss(distill=method, distill_weight=2.0)
    reference = tiny_encoder(dropout=dropout)
    if dropout:
        torch.manual_seed(9)
        q = in_chunks(reference, queries)
        d = in_chunks(reference, docs).view(BATCH, 1 + NEGATIVES, -1)
        expected = loss_fn(q, d, teacher_scores=teacher)
        expected.backward()
    else:
        expected = GradCache(reference, loss_fn)(queries, docs, teacher_scores=teacher).loss
    expected_distill = loss_fn.last_parts["distill"]
    encoder = tiny_encoder(dropout=dropout)
    torch.manual_seed(9)
    cached = GradCache(encoder, loss_fn, chunk_size=CHUNK)(queries, docs, teacher_scores=teacher)
    torch.testing.assert_close(cached.loss, expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_fn.last_parts["distill"], expected_distill, atol=1e-5, rtol=0)
    assert float(expected_distill) > 0.1  # the term is there to be compared
    assert_same_grads(grads_of(encoder), grads_of(reference))


# ------------------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Pairs with 2 hard negatives each and teacher scores; a tiny model."""
    root = tmp_path_factory.mktemp("distill")
    rows = synthetic_pairs(48, seed=3, negatives=2)
    gen = torch.Generator().manual_seed(0)
    for row in rows:
        row["scores"] = [round(float(x), 4) for x in torch.randn(3, generator=gen) * 2]
    # No dropout: each rank draws its own masks, so only without it can 2 ranks equal 1 (replay
    # under dropout is the GradCache test's).
    return {"train": write_jsonl(root / "scored.jsonl", rows), "model": write_tiny_model(root / "model")}


def distill_args(scored, *extra):
    return [f"model.name_or_path={scored['model']}", f"data.train={scored['train']}", "data.batch_size=16",
            "grad_cache.chunk_size=5", "trainer.max_steps=4", "trainer.lr=1e-3", "eval.data=null",
            "wandb.mode=disabled", "trainer.log_every=1", "loss.distill=kl", "loss.distill_weight=0.5",
            "loss.teacher_temperature=2.0", *extra]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_rank(scored, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    run_trainer(run_dir, *distill_args(scored))
    return run_dir


def test_a_distilled_run_logs_its_parts(one_rank):
    for r in records(one_rank):
        assert abs(r["loss"] - (r["loss_contrastive"] + 0.5 * r["loss_distill"])) < 1e-5, r
        assert r["loss_distill"] > 0 and -1 <= r["rank_agreement"] <= 1


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_two_ranks_and_zero2_distil_like_one_rank(scored, one_rank, tmp_path, backend):
    pytest.importorskip("deepspeed") if backend == "zero2" else None
    extra = ["trainer.backend=deepspeed", "deepspeed.zero_stage=2"] if backend == "zero2" else []
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *distill_args(scored, *extra), nproc=2)
    ours, theirs = records(run_dir), records(one_rank)
    for key in ("loss", "loss_distill"):
        reference = [r[key] for r in theirs]
        # Two ranks reduce their halves where one rank sums it whole: rounding apart, over 4 updates.
        torch.testing.assert_close([r[key] for r in ours], reference, atol=rounding_atol(4, max(reference)), rtol=0)


def test_a_distilled_run_stopped_and_resumed_equals_the_uninterrupted_one(scored, one_rank, tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *distill_args(scored, "trainer.stop_after_step=2"))
    run_trainer(run_dir, *distill_args(scored))
    # The same process arithmetic from the same checkpointed state: equal to float32 rounding of
    # the loss itself (one ulp at ~3), nothing accumulates differently.
    for key in ("loss", "loss_distill"):
        torch.testing.assert_close([r[key] for r in records(run_dir)], [r[key] for r in records(one_rank)], atol=1e-6, rtol=0)


def test_distillation_without_scores_is_refused_before_training(scored, tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", synthetic_pairs(32, negatives=2))
    proc = run_trainer(tmp_path / "run", *distill_args(scored, f"data.train={plain}"), expect_ok=False)
    assert proc.returncode != 0
    assert "loss.distill=kl needs teacher scores for every row, but 32 of 32 rows have none" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
