"""GradCache in one process: exact gradients, RNG replay, chunking details."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import token_batch, tiny_encoder
from trainer.core.chunk_plan import plan_chunks
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss

BATCH, NEGATIVES, CHUNK = 8, 1, 3


def batches(seed=0):
    return token_batch(BATCH, 12, seed), token_batch(BATCH * (1 + NEGATIVES), 20, seed + 1)


def grads_of(encoder):
    return {name: p.grad.detach().clone() for name, p in encoder.named_parameters() if p.requires_grad}


def assert_same_grads(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def split_batch(batch, chunk_size):
    """The batch's rows in its own order, in padded chunks of at most chunk_size rows."""
    return plan_chunks(batch, chunk_size, sort_by_length=False).chunks


def in_chunks(encoder, batch, sort_by_length=True, pack=True):
    """The batch embedded chunk by chunk as the step cuts it, rows back in the batch's order."""
    plan = plan_chunks(batch, CHUNK, sort_by_length=sort_by_length, pack=pack)
    out = torch.cat([encoder(**c) for c in plan.chunks])
    return out if plan.order is None else out[plan.order.argsort()]


def one_graph_chunked_grads(encoder, loss_fn, queries, docs, seed, sort_by_length=True, pack=True):
    """The reference for dropout: the same chunks forwarded in order, all kept in one autograd
    graph (no caching), after the same seed, so dropout draws the same masks."""
    torch.manual_seed(seed)
    q = in_chunks(encoder, queries, sort_by_length, pack)
    d = in_chunks(encoder, docs, sort_by_length, pack).view(BATCH, 1 + NEGATIVES, -1)
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


@pytest.mark.parametrize("sort_by_length", [True, False])
def test_cached_step_replays_dropout_masks(sort_by_length):
    queries, docs = batches()
    loss_fn = ContrastiveLoss()
    reference_encoder = tiny_encoder(dropout=0.1)
    ref_loss, ref_grads = one_graph_chunked_grads(reference_encoder, loss_fn, queries, docs, 7, sort_by_length)
    after_reference = torch.rand(4)

    encoder = tiny_encoder(dropout=0.1)
    torch.manual_seed(7)
    out = GradCache(encoder, loss_fn, chunk_size=CHUNK, sort_by_length=sort_by_length)(queries, docs)
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


@pytest.mark.parametrize("keep_graphs", [False, True], ids=["reembedded", "kept"])
def test_both_passes_run_under_autocast(keep_graphs):
    """Pass 2 must run in the same autocast as pass 1 (an fp32 re-embedding costs 3x on a GPU);
    with every graph kept there is no pass-2 forward at all: each chunk is forwarded once."""
    queries, docs = batches()
    encoder = tiny_encoder()
    seen = []  # (grad enabled?, output dtype) of one Linear layer, per forward
    layer = encoder.backbone.encoder.layer[0].intermediate.dense
    layer.register_forward_hook(lambda module, args, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    step = GradCache(encoder, ContrastiveLoss(), chunk_size=CHUNK, autocast_dtype=torch.bfloat16, keep_graphs=keep_graphs)
    out = step(queries, docs)
    n_chunks = 3 + 6  # 8 queries and 16 documents in chunks of 3
    if keep_graphs:
        assert seen == [(True, torch.bfloat16)] * n_chunks
        assert out.work.kept_chunks == n_chunks
    else:
        assert seen == [(False, torch.bfloat16)] * n_chunks + [(True, torch.bfloat16)] * n_chunks
        assert out.work.kept_chunks == 0
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


@pytest.mark.parametrize("preset", ["infonce", "gte"])
def test_length_ordered_and_token_budget_chunks_give_the_unordered_gradients(preset):
    """Ordering by length (and cutting by tokens) changes what shares a chunk, never the result:
    the loss sees the embeddings in the batch's order."""
    queries, docs = batches(seed=3)
    loss_fn = ContrastiveLoss.from_preset(preset)
    results = {}
    for name, kwargs in {
        "unordered": dict(chunk_size=CHUNK, sort_by_length=False),
        "ordered": dict(chunk_size=CHUNK),
        "tokens": dict(chunk_tokens=40),
        "tokens+rows": dict(chunk_size=2, chunk_tokens=40),
    }.items():
        encoder = tiny_encoder()
        out = GradCache(encoder, loss_fn, **kwargs)(queries, docs)
        results[name] = (out, grads_of(encoder))
    base_out, base_grads = results["unordered"]
    for name, (out, grads) in results.items():
        torch.testing.assert_close(out.loss, base_out.loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.query_embeddings, base_out.query_embeddings, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.doc_embeddings, base_out.doc_embeddings, atol=1e-5, rtol=1e-5)
        assert_same_grads(grads, base_grads)


def test_token_budget_chunks_respect_the_budget_and_ordering_cuts_padding():
    batch = token_batch(64, 40, seed=4)
    lengths = batch["attention_mask"].sum(1)
    plan = plan_chunks(batch, chunk_tokens=200)
    order, chunks = plan.order, plan.chunks
    assert torch.equal(lengths[order], lengths.sort(descending=True, stable=True).values)
    assert sum(c["input_ids"].shape[0] for c in chunks) == 64
    for chunk in chunks:
        rows, width = chunk["input_ids"].shape
        assert rows * width <= 200 or rows == 1
        assert width == int(chunk["attention_mask"].sum(1).max())  # trimmed to its longest row
    assert len({c["input_ids"].shape[0] for c in chunks}) > 1  # short texts go in bigger chunks
    # The rows are the batch's, in `order`.
    assert torch.equal(torch.cat([c["input_ids"][:, :1] for c in chunks]), batch["input_ids"][order, :1])

    def padding(chunks):
        total = sum(c["attention_mask"].numel() for c in chunks)
        return 1 - sum(int(c["attention_mask"].sum()) for c in chunks) / total

    unordered = padding(split_batch(batch, 8))
    ordered = padding(plan_chunks(batch, 8).chunks)
    assert ordered < unordered / 3, (ordered, unordered)


def test_bad_chunk_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="chunk_tokens must be > 0"):
        GradCache(tiny_encoder(), ContrastiveLoss(), chunk_tokens=0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("chunk_size", [None, CHUNK])
def test_gradient_checkpointing_leaves_losses_and_gradients_unchanged(chunk_size, lora):
    """With dropout on (the adapters' too), so the recomputed layers must draw the masks the first
    forward drew. With LoRA the layers' inputs need no gradient (the embeddings are frozen), which
    non-reentrant checkpointing must still differentiate through."""
    queries, docs = batches()
    loss_fn = ContrastiveLoss()
    results = []
    for checkpointing in (False, True):
        encoder = tiny_encoder(dropout=0.1)
        if lora:
            encoder.add_lora(r=4, alpha=8, dropout=0.1)
            with torch.no_grad():
                for name, parameter in encoder.named_parameters():
                    if "lora_B" in name:  # peft starts B at zero: A would get no gradient
                        parameter.normal_(std=0.1)
        if checkpointing:
            encoder.enable_gradient_checkpointing()
        encoder.train()
        torch.manual_seed(7)
        out = GradCache(encoder, loss_fn, chunk_size=chunk_size)(queries, docs)
        grads = grads_of(encoder)
        assert not lora or all("lora_" in name for name in grads)
        results.append((out.loss, grads, torch.rand(4)))
    (loss, grads, after), (ckpt_loss, ckpt_grads, ckpt_after) = results
    torch.testing.assert_close(ckpt_loss, loss, atol=1e-6, rtol=0)
    assert_same_grads(ckpt_grads, grads, atol=1e-6)
    torch.testing.assert_close(ckpt_after, after)  # and training's RNG stream goes on unchanged


def test_gradient_checkpointing_is_really_on():
    """Each layer runs again in the backward pass: the equality test above can fail."""
    queries, _ = batches()
    calls = []
    for checkpointing in (False, True):
        encoder = tiny_encoder()
        if checkpointing:
            encoder.enable_gradient_checkpointing()
        encoder.train()
        forwards = []
        # A module inside the layer: the checkpoint wraps the layer's forward, not its hooks.
        encoder.backbone.encoder.layer[0].intermediate.register_forward_hook(lambda *_: forwards.append(1))
        encoder(**queries).sum().backward()
        calls.append(len(forwards))
    assert calls == [1, 2]
