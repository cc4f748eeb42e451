"""The loss family against sentence-transformers, a float64 brute force, and its tiled self."""

from __future__ import annotations

import itertools

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from tests.reference import reference_loss
from trainer.core.losses import DIRECTIONS, PRESETS, ContrastiveLoss


def allowed_combinations():
    """Every directions x partition pair sentence-transformers accepts (10 of them)."""
    others = DIRECTIONS[1:]
    for k in range(len(others) + 1):
        for extra in itertools.combinations(others, k):
            directions = ("query_to_doc", *extra)
            yield directions, "joint"
            if not {"query_to_query", "doc_to_doc"} & set(extra):
                yield directions, "per_direction"


COMBINATIONS = list(allowed_combinations())


def embeddings(b=6, n=3, d=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=gen, dtype=dtype)
    # Positives close to their queries so the loss is not flat; negatives random.
    docs = torch.randn(b, 1 + n, d, generator=gen, dtype=dtype)
    docs[:, 0] += 1.5 * q
    return q, docs


def loss_and_grads(loss_fn, q, docs, **kwargs):
    q = q.clone().requires_grad_()
    docs = docs.clone().requires_grad_()
    loss = loss_fn(q, docs, **kwargs)
    loss.backward()
    return loss.detach(), q.grad, docs.grad


def test_there_are_ten_allowed_combinations():
    assert len(COMBINATIONS) == 10


@pytest.mark.parametrize("n_negatives", [0, 1, 3])
@pytest.mark.parametrize("directions,partition", COMBINATIONS)
@pytest.mark.parametrize("tile_size", [None, 5])
def test_matches_sentence_transformers(directions, partition, n_negatives, tile_size):
    q, docs = embeddings(n=n_negatives)
    ours = loss_and_grads(
        ContrastiveLoss(temperature=0.05, directions=directions, partition=partition, tile_size=tile_size), q, docs
    )

    st_loss = MultipleNegativesRankingLoss(model=None, scale=20.0, directions=directions, partition_mode=partition)
    q_ref = q.clone().requires_grad_()
    docs_ref = docs.clone().requires_grad_()
    columns = [q_ref] + [docs_ref[:, c] for c in range(1 + n_negatives)]
    theirs = st_loss.compute_loss_from_embeddings(columns, labels=None)
    theirs.backward()

    torch.testing.assert_close(ours[0], theirs.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], q_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[2], docs_ref.grad, atol=1e-5, rtol=1e-5)


def duplicated_batch(n=2):
    """A batch with repeated texts: rows 0/3 share a positive, rows 1/4 a query, and row 5's
    hard negative is row 2's positive text."""
    q, docs = embeddings(b=6, n=n, dtype=torch.float64, seed=3)
    query_hashes = [10, 11, 12, 13, 11, 15]
    doc_hashes = [[100 + 10 * i + c for c in range(1 + n)] for i in range(6)]
    doc_hashes[3][0] = doc_hashes[0][0]
    doc_hashes[5][1] = doc_hashes[2][0]
    # Identical texts embed identically: make the embeddings agree with the hashes.
    docs[3, 0] = docs[0, 0]
    q[4] = q[1]
    docs[5, 1] = docs[2, 0]
    return q, docs, query_hashes, doc_hashes


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tile_size", [None, 4])
@pytest.mark.parametrize("mask_duplicates,margin", [(True, None), (False, 0.1), (True, 0.05), (False, None)])
def test_masking_matches_float64_brute_force(preset, tile_size, mask_duplicates, margin):
    q, docs, query_hashes, doc_hashes = duplicated_batch()
    directions, partition = PRESETS[preset]
    loss_fn = ContrastiveLoss.from_preset(
        preset, temperature=0.1, mask_duplicates=mask_duplicates, false_negative_margin=margin, tile_size=tile_size
    )
    kwargs = {}
    if mask_duplicates:
        kwargs = dict(query_hashes=torch.tensor(query_hashes), doc_hashes=torch.tensor(doc_hashes))
    ours = loss_fn(q, docs, **kwargs)
    expected = reference_loss(
        q,
        docs,
        0.1,
        directions,
        partition,
        query_hashes=query_hashes if mask_duplicates else None,
        doc_hashes=doc_hashes if mask_duplicates else None,
        margin=margin,
    )
    assert ours.dtype == torch.float64
    assert abs(ours.item() - expected) < 1e-10


def test_masking_changes_the_loss():
    """Guards the test above against a batch where masking happens to do nothing."""
    q, docs, query_hashes, doc_hashes = duplicated_batch()
    hashes = dict(query_hashes=torch.tensor(query_hashes), doc_hashes=torch.tensor(doc_hashes))
    plain = ContrastiveLoss.from_preset("gte")(q, docs)
    deduplicated = ContrastiveLoss.from_preset("gte", mask_duplicates=True)(q, docs, **hashes)
    margin = ContrastiveLoss.from_preset("gte", false_negative_margin=0.0)(q, docs)
    assert deduplicated < plain - 1e-3
    assert margin < plain - 1e-3


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tile_size", [1, 3, 7, 64])
def test_tiled_equals_dense(preset, tile_size):
    q, docs, query_hashes, doc_hashes = duplicated_batch(n=3)
    hashes = dict(query_hashes=torch.tensor(query_hashes), doc_hashes=torch.tensor(doc_hashes))
    options = dict(mask_duplicates=True, false_negative_margin=0.2)
    dense = loss_and_grads(ContrastiveLoss.from_preset(preset, **options), q, docs, **hashes)
    tiled_fn = ContrastiveLoss.from_preset(preset, tile_size=tile_size, **options)
    tiled = loss_and_grads(tiled_fn, q, docs, **hashes)
    for a, b in zip(dense, tiled):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_stats_are_computed_from_the_scores():
    q, docs = embeddings(b=5, n=1, dtype=torch.float64)
    docs[:, 0] -= 1.2 * q  # weak positives, so that some rows rank a negative first
    loss_fn = ContrastiveLoss()
    loss_fn(q, docs)
    stats = loss_fn.last_stats
    qn = torch.nn.functional.normalize(q, dim=-1)
    dn = torch.nn.functional.normalize(docs, dim=-1)
    pos = (qn * dn[:, 0]).sum(-1)
    columns = dn.transpose(0, 1).reshape(-1, q.shape[1])
    cos = qn @ columns.T
    cos[torch.arange(5), torch.arange(5)] = -2.0  # drop the positive
    hardest = cos.max(dim=1).values
    assert stats.pos_sim.item() == pytest.approx(pos.mean().item())
    assert stats.neg_sim.item() == pytest.approx(hardest.mean().item())
    assert stats.accuracy.item() == pytest.approx((pos > hardest).double().mean().item())
    assert 0 < stats.accuracy.item() < 1  # the batch exercises both outcomes


def test_loss_runs_in_fp32_under_bf16_autocast():
    q, docs = embeddings()
    expected = ContrastiveLoss()(q, docs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ContrastiveLoss()(q.bfloat16(), docs.bfloat16())
    assert got.dtype == torch.float32
    # Only the bf16 rounding of the inputs differs, not a bf16 matmul of the scores.
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=0)
    exact = ContrastiveLoss()(q.bfloat16().float(), docs.bfloat16().float())
    torch.testing.assert_close(got, exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(directions=("doc_to_query",)), "must include 'query_to_doc'"),
        (dict(directions=("query_to_doc", "query_to_query"), partition="per_direction"), "per_direction"),
        (dict(directions=("query_to_doc", "sideways")), "subset"),
        (dict(partition="split"), "partition"),
        (dict(temperature=0.0), "temperature"),
        (dict(tile_size=0), "tile_size"),
        (dict(matryoshka_dims=[8, 8]), "distinct positive integers"),
        (dict(matryoshka_dims=[8, 0]), "distinct positive integers"),
        (dict(matryoshka_dims=[8, 4], matryoshka_weights=[1.0]), "one per size"),
        (dict(matryoshka_weights=[1.0]), "needs matryoshka_dims"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveLoss(**kwargs)


def test_bad_shapes_and_missing_hashes_are_clear_errors():
    q, docs = embeddings()
    with pytest.raises(ValueError, match="expected q of shape"):
        ContrastiveLoss()(q, docs[:-1])
    with pytest.raises(ValueError, match="needs query_hashes"):
        ContrastiveLoss(mask_duplicates=True)(q, docs)
    with pytest.raises(ValueError, match="unknown loss preset"):
        ContrastiveLoss.from_preset("simclr")


# -- Matryoshka -------------------------------------------------------------------------------

DIMS, WEIGHTS = (16, 8, 4), (1.0, 0.5, 0.25)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tile_size", [None, 4])
@pytest.mark.parametrize("mask_duplicates,margin", [(True, None), (False, 0.1)])
def test_matryoshka_matches_float64_brute_force(preset, tile_size, mask_duplicates, margin):
    q, docs, query_hashes, doc_hashes = duplicated_batch()
    directions, partition = PRESETS[preset]
    loss_fn = ContrastiveLoss.from_preset(
        preset, temperature=0.1, mask_duplicates=mask_duplicates, false_negative_margin=margin, tile_size=tile_size,
        matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS,
    )
    kwargs = dict(query_hashes=torch.tensor(query_hashes), doc_hashes=torch.tensor(doc_hashes)) if mask_duplicates else {}
    ours = loss_fn(q, docs, **kwargs)
    expected = sum(
        weight * reference_loss(
            q[:, :dim], docs[..., :dim], 0.1, directions, partition,
            query_hashes=query_hashes if mask_duplicates else None,
            doc_hashes=doc_hashes if mask_duplicates else None, margin=margin,
        )
        for dim, weight in zip(DIMS, WEIGHTS)
    )
    assert abs(ours.item() - expected) < 1e-10


class _EmbeddingsAsModel(torch.nn.Module):
    """What MatryoshkaLoss wraps: a 'model' whose forward returns the embeddings it is given."""

    def forward(self, features):
        return {"sentence_embedding": features["embedding"]}

    def get_embedding_dimension(self):
        return DIMS[0]


@pytest.mark.parametrize("directions,partition", [(("query_to_doc",), "joint"), (DIRECTIONS, "joint"),
                                                  (("query_to_doc", "doc_to_query"), "per_direction")])
@pytest.mark.parametrize("tile_size", [None, 5])
def test_matryoshka_matches_sentence_transformers_matryoshka_loss(directions, partition, tile_size):
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

    q, docs = embeddings(n=2, d=16)
    ours = loss_and_grads(
        ContrastiveLoss(temperature=0.05, directions=directions, partition=partition, tile_size=tile_size,
                        matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS),
        q, docs,
    )
    model = _EmbeddingsAsModel()
    inner = MultipleNegativesRankingLoss(model=model, scale=20.0, directions=directions, partition_mode=partition)
    theirs_fn = MatryoshkaLoss(model, inner, matryoshka_dims=list(DIMS), matryoshka_weights=list(WEIGHTS))
    q_ref, docs_ref = q.clone().requires_grad_(), docs.clone().requires_grad_()
    features = [{"embedding": q_ref}] + [{"embedding": docs_ref[:, c]} for c in range(docs.shape[1])]
    theirs = theirs_fn(features, labels=None)
    theirs.backward()
    torch.testing.assert_close(ours[0], theirs.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], q_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[2], docs_ref.grad, atol=1e-5, rtol=1e-5)


def test_matryoshka_sizes_beyond_the_embedding_are_a_clear_error():
    q, docs = embeddings(d=16)
    with pytest.raises(ValueError, match="exceed the embedding size 16"):
        ContrastiveLoss(matryoshka_dims=[32, 16])(q, docs)
