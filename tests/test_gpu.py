"""GPU checks (`pytest -m gpu`): skipped where CUDA is not available, as on CI.

A bf16 CUDA run of the Hydra app (NCCL with two ranks where two GPUs exist), GradCache's exact
gradients and dropout replay with CUDA generators, pinned-memory batches, and mining with the
pool's shard on the GPU against the CPU.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.test_gradcache import BATCH, CHUNK, NEGATIVES, batches, grads_of, in_chunks
from tests.test_mine import assets, compose_mine, mine_args, read_jsonl  # noqa: F401 (assets: the mining fixture)
from tests.tiny import run_trainer, synthetic_pairs, tiny_encoder, write_beir, write_jsonl, write_tiny_model
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss
from trainer.mining.miner import mine

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


def _one_graph_reference(queries, docs, loss_fn, seed: int = 7):
    """The step's own chunks forwarded in one graph from `seed` (dropout 0.1), and backward."""
    reference = tiny_encoder(dropout=0.1).cuda()
    torch.cuda.manual_seed(seed)
    q = in_chunks(reference, queries)
    loss_fn(q, in_chunks(reference, docs).view(BATCH, 1 + NEGATIVES, -1)).backward()
    return reference


def test_dropout_replay_with_cuda_generators():
    queries, docs = (_to_cuda(b) for b in batches())
    loss_fn = ContrastiveLoss()
    reference = _one_graph_reference(queries, docs, loss_fn)
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
    from trainer.core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(write_tiny_model(tmp_path / "model")))
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(32))
    data = prepare(parse_sources(str(train)), Columns(), tokenizer, TokenSettings(8, 12), tmp_path / "cache")
    steps = StepBatches(data, GlobalBatches(data.sizes, 8, 0), tokenizer, 0, 0, 2)
    loader = torch.utils.data.DataLoader(steps, batch_size=None, pin_memory=True)  # as the trainer builds it on CUDA
    batch = next(iter(loader))
    assert batch["queries"]["input_ids"].is_pinned() and batch["docs"]["attention_mask"].is_pinned()
    moved = batch["queries"]["input_ids"].to("cuda", non_blocking=True)
    torch.testing.assert_close(moved.cpu(), batch["queries"]["input_ids"])


def _agree_apart_from_ties(cpu_row: dict, gpu_row: dict, tie: float) -> None:
    """Scores agree position by position within `tie`; a negative must be the same text unless
    its score lies within 2 x tie of another negative's in the row (then the two devices'
    roundings may order near-equal candidates either way)."""
    ours, theirs = np.asarray(cpu_row["negative_scores"]), np.asarray(gpu_row["negative_scores"])
    np.testing.assert_allclose(theirs, ours, atol=tie)
    for i, (a, b) in enumerate(zip(cpu_row["negatives"], gpu_row["negatives"])):
        if a != b:
            others = np.delete(ours, i)
            assert others.size and np.abs(others - ours[i]).min() <= 2 * tie, (i, a, b, ours)


@pytest.mark.parametrize("retriever, pools", [("dense", ("fp32", "fp16")), ("hybrid", ("fp32",))])
def test_mining_on_cuda_equals_the_cpu(assets, tmp_path, retriever, pools):  # noqa: F811 (assets: the fixture)
    """The pool's shard held and searched on the GPU. In fp32 the encoder's and the search's sums
    run in another order than on the CPU: unit-vector cosines then differ by a few fp32 ulps
    (~1e-7 each, over a 32-dim model's few layers), so 1e-5 bounds them with room. fp16 (the
    GPU's default pool) rounds each stored coordinate to 2^-11 relative: 4e-3, as on the CPU.
    Hybrid orders negatives by fused rank, not score, so its fp16 run (whose dense ranks may
    swap near-equal candidates) is not compared position by position."""
    common = (f"retriever={retriever}", "max_score_ratio=null", "margin=-1.0", "block_rows=16", "precision=fp32")
    mine(compose_mine(*mine_args(assets, tmp_path / "cpu.jsonl", *common, "device=cpu")))
    cpu = read_jsonl(tmp_path / "cpu.jsonl")
    assert len(cpu) == 40  # margin -1 keeps every candidate: every row is written
    for pool in pools:
        mine(compose_mine(*mine_args(assets, tmp_path / f"{pool}.jsonl", *common, "device=cuda", f"pool_dtype={pool}")))
        gpu = read_jsonl(tmp_path / f"{pool}.jsonl")
        assert [(r["query"], r["positive"]) for r in gpu] == [(r["query"], r["positive"]) for r in cpu]
        for cpu_row, gpu_row in zip(cpu, gpu):
            _agree_apart_from_ties(cpu_row, gpu_row, {"fp32": 1e-5, "fp16": 4e-3}[pool])


# ------------------------------------------------------------------ packed chunks, kept graphs


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@pytest.mark.parametrize("dtype,kernel", [(torch.float32, "grid"), (torch.bfloat16, "grid"), (torch.bfloat16, "varlen")],
                         ids=["fp32-grid", "bf16-grid", "bf16-varlen"])
def test_packed_embeddings_equal_the_padded_model_on_cuda(dtype, kernel, monkeypatch):
    """Both packed kernels against the padded model: torch's flash varlen kernel (taken in bf16/fp16
    without attention dropout) and the grid + SDPA path (taken with dropout or in fp32; forced
    here with the varlen kernel hidden, so that the outputs are comparable). fp32 without TF32: the same sums in another order, 1e-5 of values of order 1
    (as on the CPU). bf16: each matmul rounds to 8 bits (relative 2**-8); two kernels' roundings
    differ by a few of those per element, so embeddings agree in direction, cosine >= 0.999 (a
    text attending outside itself gives cosines far below: 0.9 or less in the CPU tests' model)."""
    from tests.test_packing import packed_embeddings

    import trainer.core.packing

    if kernel == "grid":
        monkeypatch.setattr(trainer.packing, "_VARLEN", None)
    elif trainer.core.packing._VARLEN is None:
        pytest.fail("torch.nn.attention.varlen is missing: this torch cannot run packed attention's CUDA kernel")
    encoder = tiny_encoder().cuda().eval()
    batch = _to_cuda(batches()[1])
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        padded = encoder(**batch)
        packed = packed_embeddings(encoder, batch)
    if dtype == torch.float32:
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    else:
        assert _cosines(packed, padded).min() >= 0.999


@pytest.mark.parametrize("keep_graphs", [True, False], ids=["kept", "reembedded"])
def test_packed_kept_step_with_dropout_on_cuda_equals_its_one_graph_reference(keep_graphs):
    """CUDA generators, dropout 0.1 in the grid kernel's SDPA and the linear layers: kept graphs
    and re-embedded chunks both reproduce the one-graph reference of the same packed chunks."""
    queries, docs = (_to_cuda(b) for b in batches())
    loss_fn = ContrastiveLoss()
    reference = _one_graph_reference(queries, docs, loss_fn)
    encoder = tiny_encoder(dropout=0.1).cuda()
    torch.cuda.manual_seed(7)
    out = GradCache(encoder, loss_fn, chunk_size=CHUNK, keep_graphs=keep_graphs)(queries, docs)
    assert out.work.kept_chunks == (out.work.chunks if keep_graphs else 0)
    for name, grad in grads_of(reference).items():
        torch.testing.assert_close(grads_of(encoder)[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_passes_draw_the_same_dropout_masks():
    """trainer.compile: the transformer under torch.compile (dynamic shapes), dropout 0.1, every
    chunk re-embedded: pass 2's compiled forward must redraw pass 1's masks. Reference: the same
    compiled model, all chunks in one graph from the same seed (compiled dropout draws its own
    numbers, so the uncompiled model is no reference). 1e-4: compiled kernels fuse and reorder
    fp32 sums (1e-6 relative) across two separately compiled graphs (no-grad and grad)."""
    queries, docs = (_to_cuda(b) for b in batches())
    loss_fn = ContrastiveLoss()
    results = []
    for cached in (False, True):
        encoder = tiny_encoder(dropout=0.1).cuda()
        encoder.backbone.compile(dynamic=True)
        torch.cuda.manual_seed(7)
        if cached:
            GradCache(encoder, loss_fn, chunk_size=CHUNK, keep_graphs=False)(queries, docs)
        else:
            q = in_chunks(encoder, queries)
            loss_fn(q, in_chunks(encoder, docs).view(BATCH, 1 + NEGATIVES, -1)).backward()
        results.append(grads_of(encoder))
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, atol=1e-4, rtol=1e-3, msg=name)
