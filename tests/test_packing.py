"""Packed chunks (trainer/core/packing.py) compute what padded chunks compute, and kept graphs
(trainer/core/kept_graphs.py) what re-embedded chunks compute: embeddings, losses, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, Qwen3Config, Qwen3Model

from tests.tiny import VOCAB_SIZE, token_batch, tiny_encoder
from trainer.core.chunk_plan import LENGTHS, HostLengths, plan_chunks
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss
from trainer.core.model import Encoder

BATCH = 8

# fp32 on the CPU. Packed and padded texts go through the same weights in another arrangement:
# the linear layers see the same rows (the same dot products, bit for bit or one rounding apart),
# attention runs over the same keys with padding masked either way; what differs is the order of
# a few reductions (the attention grid, the pooling sum). Each rounds at 2**-24 relative; through
# 2 layers and a mean over <= 20 tokens that stays far below 1e-5 of values of order 1. A text
# attending outside itself, a shifted position or a pooled padding token moves them by 1e-2 or more.
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_decoder(pooling: str) -> Encoder:
    """A random Qwen3: causal attention, rotary positions, grouped-query attention (4 / 2 heads)."""
    config = Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    return Encoder(Qwen3Model(config), pooling=pooling)


def tiny_modernbert(pooling: str) -> Encoder:
    """A random ModernBERT: rotary positions, and local attention (a window of 4 tokens, so +-2)
    in two layers of three: the window must stay inside each text and keep its width when packed."""
    from transformers import ModernBertConfig, ModernBertModel

    config = ModernBertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, max_position_embeddings=64, local_attention=4,
                              global_attn_every_n_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              cls_token_id=1, sep_token_id=2)
    torch.manual_seed(0)
    return Encoder(ModernBertModel(config), pooling=pooling)


def left_padded(batch: dict) -> dict:
    """The same texts with their padding moved to the left."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    index = (torch.arange(width)[None, :] - (width - mask.sum(1))[:, None]) % width
    return {key: torch.gather(value, 1, index) for key, value in batch.items()}


def packed_embeddings(encoder, batch, chunk_size: int = 3) -> torch.Tensor:
    plan = plan_chunks(batch, chunk_size, pack=True)
    out = torch.cat([encoder(**chunk) for chunk in plan.chunks])
    return out[plan.order.argsort()]


# Left padding only where the padded model itself reads a left-padded text as it reads it alone:
# rotary positions (Qwen3) with mean or last-token pooling. (BERT's absolute positions shift with
# left padding, and CLS pooling of a left-padded row takes a pad token.) Packing gives every text
# the positions it has alone.
CASES = [(m, p, "right") for m in ("bert", "qwen3", "modernbert") for p in ("mean", "cls", "last_token")]
CASES += [("qwen3", "mean", "left"), ("qwen3", "last_token", "left")]


@pytest.mark.parametrize("model,pooling,padding_side", CASES)
def test_packed_embeddings_equal_the_padded_model(model, pooling, padding_side):
    build = {"bert": lambda: tiny_encoder(pooling=pooling), "qwen3": lambda: tiny_decoder(pooling),
             "modernbert": lambda: tiny_modernbert(pooling)}[model]
    encoder = build().eval()
    assert encoder.supports_packing
    batch = token_batch(7, 16, seed=3)
    if padding_side == "left":
        batch = left_padded(batch)
    with torch.no_grad():
        padded = encoder(**batch)
        packed = packed_embeddings(encoder, batch)
    torch.testing.assert_close(packed, padded, **TOL)


def test_a_packed_chunk_holds_real_tokens_only_with_positions_per_text():
    batch = token_batch(5, 12, seed=1)
    lengths = batch["attention_mask"].sum(1)
    plan = plan_chunks(batch, chunk_tokens=10**6, pack=True, sort_by_length=False)
    (chunk,) = plan.chunks
    assert chunk["input_ids"].shape == (1, int(lengths.sum()))
    assert torch.equal(chunk["input_ids"][0], batch["input_ids"][batch["attention_mask"].bool()])
    expected_positions = torch.cat([torch.arange(int(n)) for n in lengths])
    assert torch.equal(chunk["position_ids"][0], expected_positions)
    assert chunk["packed"].cu_seq_lens.tolist() == [0, *np.cumsum(lengths.numpy()).tolist()]
    assert plan.computed_tokens.tolist() == plan.real_tokens.tolist() == [int(lengths.sum())]


def test_packed_token_budgets_count_real_tokens():
    batch = token_batch(64, 40, seed=4)
    lengths = batch["attention_mask"].sum(1)
    plan = plan_chunks(batch, chunk_tokens=200, pack=True)
    assert plan.real_tokens.sum() == lengths.sum()
    for chunk, real in zip(plan.chunks, plan.real_tokens):
        assert chunk["input_ids"].shape[1] == real <= 200 or chunk["packed"].num_texts == 1
    padded = plan_chunks(batch, chunk_tokens=200)
    assert len(plan.chunks) < len(padded.chunks)  # real tokens fill a budget that padding wastes


def test_host_lengths_plan_like_the_mask_and_are_never_fed_to_the_model():
    batch = token_batch(9, 16, seed=5)
    known = {**batch, LENGTHS: HostLengths(batch["attention_mask"].sum(1).numpy())}
    for pack in (False, True):
        from_mask, from_host = plan_chunks(batch, 4, pack=pack), plan_chunks(known, 4, pack=pack)
        assert torch.equal(from_mask.order, from_host.order)
        for a, b in zip(from_mask.chunks, from_host.chunks):
            assert LENGTHS not in b
            assert torch.equal(a["input_ids"], b["input_ids"])
    encoder = tiny_encoder()
    GradCache(encoder, ContrastiveLoss(), chunk_size=4)(known, {**token_batch(9, 20, 6)})


def batches(seed=0):
    return token_batch(BATCH, 12, seed), token_batch(2 * BATCH, 20, seed + 1)


def step_grads(model: str, seed: int | None = None, **kwargs):
    """One step's loss and gradients (dropout 0.1 when seed is given, replayed from it)."""
    encoder = tiny_encoder(dropout=0.1 if seed is not None else 0.0) if model == "bert" else tiny_decoder("last_token")
    encoder.train()
    if seed is not None:
        torch.manual_seed(seed)
    out = GradCache(encoder, ContrastiveLoss.from_preset("gte"), **kwargs)(*batches())
    return out, {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, **TOL)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        # Relative to the tensor's largest entry: some true gradients are rounding-sized (key biases).
        scale = max(float(grads_b[name].abs().max()), 1e-3)
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5 * scale, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("model", ["bert", "qwen3"])
def test_packed_kept_step_equals_the_padded_reembedded_step(model):
    """The new defaults (packed chunks, kept graphs) against the classic GradCache step."""
    classic = step_grads(model, chunk_size=3, pack=False, keep_graphs=False)
    for pack in (False, True):
        for keep in (False, True):
            out = step_grads(model, chunk_size=3, pack=pack, keep_graphs=keep)
            assert out[0].work.kept_chunks == (out[0].work.chunks if keep else 0)
            assert_same(out, classic)
    assert_same(step_grads(model, pack=True), step_grads(model, pack=False))  # the plain step too


def test_kept_graphs_replay_dropout_like_reembedded_chunks():
    kept = step_grads("bert", seed=7, chunk_size=3, keep_graphs=True)
    reembedded = step_grads("bert", seed=7, chunk_size=3, keep_graphs=False)
    assert_same(kept, reembedded)
    with pytest.raises(AssertionError):  # dropout is on: another seed gives other gradients
        assert_same(step_grads("bert", seed=8, chunk_size=3, keep_graphs=True), reembedded)


def counting_tokens(step: GradCache) -> None:
    """Make the step's keeper count 1000 bytes per token a graph holds (a tiny model's real
    growth of resident memory is too small and too coarse to plan a test by)."""
    held = [0]
    step.bare.register_forward_pre_hook(
        lambda module, args, kwargs: held.__setitem__(0, held[0] + 1000 * kwargs["input_ids"].numel() * torch.is_grad_enabled()),
        with_kwargs=True)
    step.keeper.bytes_in_use = lambda: held[0]


def test_a_byte_budget_keeps_the_graphs_that_fit_and_changes_nothing():
    full = step_grads("bert", seed=7, chunk_size=3, keep_graphs=True)
    encoder = tiny_encoder(dropout=0.1).train()
    step = GradCache(encoder, ContrastiveLoss.from_preset("gte"), chunk_size=3, keep_graphs=100_000)
    counting_tokens(step)
    torch.manual_seed(7)
    out = step(*batches())
    plan_tokens = [int(t) for side in batches() for t in plan_chunks(side, 3, pack=True).real_tokens]
    # The rule, by hand: the first chunk is kept unmeasured; then each chunk whose tokens, at the
    # bytes per token measured so far, fit in what the budget has left.
    used, per_token, fitting = 0, 0, 0
    for tokens in plan_tokens:
        if used + per_token * tokens <= 100_000:
            used, per_token, fitting = used + 1000 * tokens, 1000, fitting + 1
    assert out.work.kept_chunks == fitting and 0 < fitting < out.work.chunks, (out.work, plan_tokens)
    assert_same((out, {n: p.grad.clone() for n, p in encoder.named_parameters()}), full)


class RunsOutWhileKeeping(torch.nn.Module):
    """An encoder whose forwards with grad run out of memory once `allowed` of them have run
    (the way a real device fails in the middle of pass 1)."""

    def __init__(self, encoder: Encoder, allowed: int) -> None:
        super().__init__()
        self.encoder, self.allowed, self.grad_forwards = encoder, allowed, 0
        self.supports_packing = encoder.supports_packing

    def forward(self, **inputs):
        if torch.is_grad_enabled():
            self.grad_forwards += 1
            if self.grad_forwards == self.allowed + 1:
                self.encoder(**inputs)  # partway: a graph is being built when memory runs out
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.encoder(**inputs)


def test_running_out_of_memory_while_keeping_keeps_fewer_graphs_with_the_same_result():
    reference = step_grads("bert", seed=7, chunk_size=3, keep_graphs=False)
    encoder = tiny_encoder(dropout=0.1).train()
    failing = RunsOutWhileKeeping(encoder, allowed=2)
    step = GradCache(failing, ContrastiveLoss.from_preset("gte"), chunk_size=3, keep_graphs=True)
    counting_tokens(step)
    torch.manual_seed(7)
    out = step(*batches())
    assert out.work.kept_chunks == 2  # the third kept forward failed: it and the rest re-embedded
    assert_same((out, {n: p.grad.clone() for n, p in encoder.named_parameters()}), reference)
    failing.allowed = 10**6  # no more failures: the next step keeps at most what had fit
    torch.manual_seed(7)
    assert step(*batches()).work.kept_chunks <= 2
