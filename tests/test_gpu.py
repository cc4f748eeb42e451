"""GPU checks (`pytest -m gpu`): skipped where CUDA is not available, as on CI.

A bf16 CUDA run of the Hydra app (NCCL with two ranks where two GPUs exist), GradCache's exact
gradients and dropout replay with CUDA generators, and pinned-memory batches.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.test_gradcache import BATCH, CHUNK, NEGATIVES, batches, grads_of, in_chunks
from tests.tiny import run_trainer, synthetic_pairs, tiny_encoder, write_beir, write_jsonl, write_tiny_model
from trainer.gradcache import GradCache
from trainer.losses import ContrastiveLoss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _to_cuda(batch):
    return {k: v.cuda() for k, v in batch.items()}


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 would round the reference and the step differently."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bf16_cuda_training_through_the_app(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(64, seed=1))
    dev = write_beir(tmp_path / "dev", synthetic_pairs(20, seed=2))
    nproc = min(2, torch.cuda.device_count())
    run_dir = tmp_path / "run"
    proc = run_trainer(run_dir, f"model.name_or_path={model}", f"data.train={train}", f"eval.data={dev}",
                       "data.batch_size=16", "grad_cache.chunk_size=4", "trainer.max_steps=4", "trainer.lr=1e-3",
                       "trainer.precision=bf16", "trainer.device=cuda", "wandb.mode=disabled", nproc=nproc)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert (run_dir / "model" / "model.safetensors").exists()
    assert "NDCG@10 before" in proc.stdout


@pytest.mark.parametrize("sort_by_length", [True, False])
def test_cached_step_equals_plain_step_on_cuda(sort_by_length):
    queries, docs = (_to_cuda(b) for b in batches())
    loss_fn = ContrastiveLoss.from_preset("gte")
    plain_encoder, cached_encoder = tiny_encoder().cuda(), tiny_encoder().cuda()
    plain = GradCache(plain_encoder, loss_fn)(queries, docs)
    cached = GradCache(cached_encoder, loss_fn, chunk_size=CHUNK, sort_by_length=sort_by_length)(queries, docs)
    torch.testing.assert_close(cached.loss, plain.loss, atol=1e-5, rtol=0)
    for name, grad in grads_of(plain_encoder).items():
        torch.testing.assert_close(grads_of(cached_encoder)[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_replay_with_cuda_generators():
    queries, docs = (_to_cuda(b) for b in batches())
    loss_fn = ContrastiveLoss()
    reference = tiny_encoder(dropout=0.1).cuda()
    torch.cuda.manual_seed(7)
    q = in_chunks(reference, queries)
    d = in_chunks(reference, docs).view(BATCH, 1 + NEGATIVES, -1)
    loss_fn(q, d).backward()
    after_reference = torch.rand(4, device="cuda")

    encoder = tiny_encoder(dropout=0.1).cuda()
    torch.cuda.manual_seed(7)
    GradCache(encoder, loss_fn, chunk_size=CHUNK)(queries, docs)
    after_step = torch.rand(4, device="cuda")
    for name, grad in grads_of(reference).items():
        torch.testing.assert_close(grads_of(encoder)[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(after_step, after_reference)  # the CUDA generator ends where it would


def test_batches_arrive_in_pinned_memory(tmp_path):
    from trainer.data import Columns, GlobalBatches, StepBatches, TokenSettings, parse_sources, prepare
    from trainer.model import load_tokenizer

    tokenizer = load_tokenizer(str(write_tiny_model(tmp_path / "model")))
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(32))
    data = prepare(parse_sources(str(train)), Columns(), tokenizer, TokenSettings(8, 12), tmp_path / "cache")
    steps = StepBatches(data, GlobalBatches(data.sizes, 8, 0), tokenizer, 0, 0, 2)
    loader = torch.utils.data.DataLoader(steps, batch_size=None, pin_memory=True)  # as the trainer builds it on CUDA
    batch = next(iter(loader))
    assert batch["queries"]["input_ids"].is_pinned() and batch["docs"]["attention_mask"].is_pinned()
    moved = batch["queries"]["input_ids"].to("cuda", non_blocking=True)
    torch.testing.assert_close(moved.cpu(), batch["queries"]["input_ids"])
