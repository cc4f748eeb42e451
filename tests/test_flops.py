"""MFU's parts: model FLOPs counted from the config, the device's peak."""

from __future__ import annotations

import torch

from tests.tiny import token_batch, tiny_encoder
from trainer.core.flops import ModelFlops, device_peak_tflops
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss


def test_model_flops_count_non_embedding_weights_and_attention_per_real_token():
    encoder = tiny_encoder()  # hidden 32, 2 layers, intermediate 64, vocab 97, 64 positions
    h, i, layers = 32, 64, 2
    # Per layer: q, k, v, attention output (4 h x h + 4 h), the MLP (2 h x i + i + h), 2 layer norms (4 h).
    per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
    flops = ModelFlops(encoder)
    assert flops.parameters == layers * per_layer + 2 * h  # + the embeddings' layer norm
    assert flops.attention_width == h and flops.layers == layers

    queries, docs = token_batch(4, 8, 0), token_batch(4, 10, 1)
    lengths = torch.cat([queries["attention_mask"].sum(1), docs["attention_mask"].sum(1)])
    out = GradCache(encoder, ContrastiveLoss(), chunk_size=2, keep_graphs=False)(queries, docs)
    real, squares = int(lengths.sum()), int((lengths ** 2).sum())
    assert out.work.real_tokens == real and out.work.token_passes == 4 * real  # every chunk re-embedded
    assert flops.of(out.work) == 4 * (2 * flops.parameters * real + 4 * layers * h * squares)
    kept = GradCache(tiny_encoder(), ContrastiveLoss(), chunk_size=2, keep_graphs=True)(queries, docs)
    assert kept.work.token_passes == 3 * real and kept.work.kept_chunks == kept.work.chunks


def test_the_peak_comes_from_the_override_else_the_table_else_none():
    assert device_peak_tflops(torch.device("cpu")) is None
    assert device_peak_tflops(torch.device("cpu"), override=123.0) == 123.0
    from trainer.core.flops import PEAK_TFLOPS

    assert PEAK_TFLOPS["H200"] == PEAK_TFLOPS["H100"] == 989.0  # dense bf16, the data sheets' figure
