"""GradCache in one process: exact gradients, RNG replay, chunking details."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import token_batch, tiny_encoder
from trainer.gradcache import GradCache, split_batch
from trainer.losses import ContrastiveLoss

BATCH, NEGATIVES, CHUNK = 8, 1, 3


def batches(seed=0):
    return token_batch(BATCH, 12, seed), token_batch(BATCH * (1 + NEGATIVES), 20, seed + 1)


def grads_of(encoder):
    return {name: p.grad.detach().clone() for name, p in encoder.named_parameters()}


def assert_same_grads(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def one_graph_chunked_grads(encoder, loss_fn, queries, docs, seed):
    """The reference for dropout: the same chunks forwarded in order, all kept in one autograd
    graph (no caching), after the same seed, so dropout draws the same masks."""
    torch.manual_seed(seed)
    q = torch.cat([encoder(**c) for c in split_batch(queries, CHUNK)])
    d = torch.cat([encoder(**c) for c in split_batch(docs, CHUNK)]).view(BATCH, 1 + NEGATIVES, -1)
    loss = loss_fn(q, d)
    loss.backward()
    return loss.detach(), grads_of(encoder)


@pytest.mark.parametrize("preset", ["infonce", "gte"])
def test_cached_step_equals_plain_full_batch_step_without_dropout(preset):
    queries, docs = batches()
    loss_fn = ContrastiveLoss.from_preset(preset)
    plain_encoder, cached_encoder = tiny_encoder(), tiny_encoder()
    plain = GradCache(plain_encoder, loss_fn)(queries, docs)
    cached = GradCache(cached_encoder, loss_fn, chunk_size=CHUNK)(queries, docs)
    torch.testing.assert_close(cached.loss, plain.loss, atol=1e-6, rtol=0)
    assert_same_grads(grads_of(cached_encoder), grads_of(plain_encoder))


def test_cached_step_replays_dropout_masks():
    queries, docs = batches()
    loss_fn = ContrastiveLoss()
    reference_encoder = tiny_encoder(dropout=0.1)
    ref_loss, ref_grads = one_graph_chunked_grads(reference_encoder, loss_fn, queries, docs, seed=7)
    after_reference = torch.rand(4)

    encoder = tiny_encoder(dropout=0.1)
    torch.manual_seed(7)
    out = GradCache(encoder, loss_fn, chunk_size=CHUNK)(queries, docs)
    after_step = torch.rand(4)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=0)
    assert_same_grads(grads_of(encoder), ref_grads)
    # The generator ends where the uncached forward leaves it: training draws the same numbers.
    torch.testing.assert_close(after_step, after_reference)


def test_dropout_is_really_on_in_the_replay_test():
    """Without the same RNG sequence the gradients differ: the replay test can fail."""
    queries, docs = batches()
    loss_fn = ContrastiveLoss()
    _, seven = one_graph_chunked_grads(tiny_encoder(dropout=0.1), loss_fn, queries, docs, seed=7)
    _, eight = one_graph_chunked_grads(tiny_encoder(dropout=0.1), loss_fn, queries, docs, seed=8)
    with pytest.raises(AssertionError):
        assert_same_grads(seven, eight)


def test_both_passes_run_under_autocast():
    """Pass 2 must run in the same autocast as pass 1 (an fp32 re-embedding costs 3x on a GPU)."""
    queries, docs = batches()
    encoder = tiny_encoder()
    seen = []  # (grad enabled?, output dtype) of one Linear layer, per forward
    layer = encoder.backbone.encoder.layer[0].intermediate.dense
    layer.register_forward_hook(lambda module, args, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    out = GradCache(encoder, ContrastiveLoss(), chunk_size=CHUNK, autocast_dtype=torch.bfloat16)(queries, docs)
    n_chunks = 3 + 6  # 8 queries and 16 documents in chunks of 3
    assert seen[:n_chunks] == [(False, torch.bfloat16)] * n_chunks
    assert seen[n_chunks:] == [(True, torch.bfloat16)] * n_chunks
    assert out.query_embeddings.dtype == torch.float32  # pooled and cached in fp32

    plain_encoder = tiny_encoder()
    plain = GradCache(plain_encoder, ContrastiveLoss(), autocast_dtype=torch.bfloat16)(queries, docs)
    torch.testing.assert_close(out.loss, plain.loss, atol=2e-2, rtol=0)


def test_split_batch_trims_trailing_padding_only():
    batch = token_batch(7, 16, seed=1)
    batch["attention_mask"][:, 10:] = 0
    batch["input_ids"][:, 10:] = 0
    chunks = split_batch(batch, 3)
    assert [c["input_ids"].shape[0] for c in chunks] == [3, 3, 1]
    assert all(c["input_ids"].shape[1] <= 10 for c in chunks)
    for start, chunk in zip(range(0, 7, 3), chunks):
        width = chunk["input_ids"].shape[1]
        assert torch.equal(chunk["input_ids"], batch["input_ids"][start : start + 3, :width])
        assert batch["attention_mask"][start : start + 3, width:].sum() == 0


def test_trimmed_chunks_embed_like_untrimmed_ones():
    encoder = tiny_encoder().eval()
    batch = token_batch(6, 16, seed=2)
    batch["attention_mask"][:, 9:] = 0
    with torch.no_grad():
        full = encoder(**batch)
        trimmed = torch.cat([encoder(**c) for c in split_batch(batch, 2)])
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


def test_bad_document_count_is_a_clear_error():
    queries, _ = batches()
    with pytest.raises(ValueError, match="expected b \\* \\(1 \\+ n\\) documents"):
        GradCache(tiny_encoder(), ContrastiveLoss(), chunk_size=3)(queries, token_batch(BATCH + 1, 8, 0))
