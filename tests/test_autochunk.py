"""Chunk and batch sizes the framework picks (trainer/core/autochunk.py): the probe, the halving retry,
and real out-of-memory errors on a CPU, made by an address-space limit (RLIMIT_AS) in a
subprocess where a too-large chunk fails to allocate.

RLIMIT_AS limits address space, not memory in use, and glibc's heap keeps the address space of
freed blocks (its threshold for mmap-ing a block rises after a large one is freed). A memory limit
(a cgroup) would not count those. So the limited runs fix glibc's threshold, MALLOC_MMAP_THRESHOLD_:
freed blocks then leave the address space, and the limit measures what is in use. They also turn
off oneDNN's primitive cache, which keeps the memory of the large primitives a failed chunk made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.test_gradcache import batches, grads_of
from tests.tiny import REPO, WORDS, rounding_atol, run_trainer, run_torchrun, tiny_encoder, write_jsonl, write_tiny_model
from trainer.core.autochunk import AdaptiveStep, largest_fitting, parse_size, split_on_oom
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss

LIMITED_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
               "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}


def limited(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **LIMITED_ENV)
    cmd = [sys.executable, str(REPO / "tests" / "memory_scripts" / script), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ the probe


@pytest.mark.parametrize("fits", [1, 7, 8, 100, 1000])
def test_the_probe_lands_within_2x_of_the_largest_size_that_fits(fits):
    tried = []

    def trial(n):
        tried.append(n)
        if n > fits:
            raise torch.OutOfMemoryError(f"{n} > {fits}")

    result = largest_fitting(trial, torch.device("cpu"), start=8, cap=512)
    assert result.rows <= min(fits, 512) < 2 * result.rows or result.rows == 512
    assert all(n <= 512 for n in tried)


def test_the_probe_refuses_when_even_the_smallest_size_fails():
    def trial(n):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    with pytest.raises(RuntimeError, match=r"out of memory at the smallest size tried \(1\)"):
        largest_fitting(trial, torch.device("cpu"), start=1, cap=64)


def test_other_errors_are_not_taken_for_out_of_memory():
    def trial(n):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        largest_fitting(trial, torch.device("cpu"), start=1, cap=64)


def test_sizes_in_the_config():
    assert parse_size("auto", "k") == "auto" and parse_size("AUTO ", "k") == "auto"
    assert parse_size(0, "k") is None and parse_size(None, "k") is None and parse_size("512", "k") == 512
    with pytest.raises(ValueError, match="grad_cache.chunk_tokens must be a positive integer or 'auto', got 'lots'"):
        parse_size("lots", "grad_cache.chunk_tokens")


# --------------------------------------------------------------- halving, errors injected


# The classic step (padded chunks, every one re-embedded), whose pass 1 runs without grad: what the
# failures below are injected by. Kept graphs' own fallback is tested in tests/test_packing.py.
CLASSIC = dict(pack=False, keep_graphs=False)


class FailsAbove(torch.nn.Module):
    """The tiny encoder, failing like an allocator when a chunk holds more than `tokens` padded
    tokens: in pass 1 (no grad) or pass 2 (grad), as asked."""

    def __init__(self, tokens: int, when: str) -> None:
        super().__init__()
        self.inner, self.tokens, self.when = tiny_encoder(dropout=0.1), tokens, when

    def forward(self, input_ids, attention_mask):
        in_pass_2 = torch.is_grad_enabled()
        if input_ids.numel() > self.tokens and (self.when == "both" or (self.when == "pass 2") == in_pass_2):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("when", ["pass 1", "pass 2", "both"])
def test_a_step_that_runs_out_of_memory_is_run_again_with_half_the_budget(when):
    """With dropout: the retried step equals a step run at the final budget from the start, bit
    for bit (the same chunks and the same generator states, so the same arithmetic), and the
    generator ends where that step leaves it."""
    queries, docs = batches()
    failing = FailsAbove(tokens=60, when=when)
    said = []
    step = AdaptiveStep(GradCache(failing, ContrastiveLoss(), chunk_tokens=400, recover_oom=True, **CLASSIC), torch.device("cpu"),
                        say=said.append)
    torch.manual_seed(3)
    out = step(queries, docs)
    after = torch.rand(4)
    assert step.budget <= 60 and [c[1] for c in step.changes] == [400 >> i for i in range(len(step.changes))]
    assert {c[3] for c in step.changes} == ({"pass 1"} if when != "pass 2" else {"pass 2"})
    assert len(said) == len(step.changes) and "chunk budget 400 -> 200 tokens" in said[0]

    reference = tiny_encoder(dropout=0.1)
    torch.manual_seed(3)
    expected = GradCache(reference, ContrastiveLoss(), chunk_tokens=step.budget, **CLASSIC)(queries, docs)
    assert torch.equal(torch.rand(4), after)
    assert torch.equal(out.loss, expected.loss)
    for name, grad in grads_of(reference).items():
        assert torch.equal(grads_of(failing.inner)[name], grad), name


def test_halving_stops_at_one_text_per_chunk_with_a_hint():
    queries, docs = batches()
    step = AdaptiveStep(GradCache(FailsAbove(tokens=0, when="both"), ContrastiveLoss(), chunk_size=4, recover_oom=True, **CLASSIC),
                        torch.device("cpu"), say=lambda _: None)
    with pytest.raises(RuntimeError, match="already one text each.*loss.tile_size"):
        step(queries, docs)
    assert [c[2] for c in step.changes] == [2, 1]


def test_without_recovery_the_error_is_the_allocators():
    queries, docs = batches()
    with pytest.raises(torch.OutOfMemoryError):
        GradCache(FailsAbove(tokens=10, when="both"), ContrastiveLoss(), chunk_tokens=400)(queries, docs)
    with pytest.raises(ValueError, match="recover_oom=True"):
        AdaptiveStep(GradCache(tiny_encoder(), ContrastiveLoss(), chunk_size=4), torch.device("cpu"))


def test_recovery_needs_cleared_gradients():
    queries, docs = batches()
    encoder = tiny_encoder()
    next(encoder.parameters()).grad = torch.zeros_like(next(encoder.parameters()))
    with pytest.raises(ValueError, match="gradients cleared"):
        GradCache(encoder, ContrastiveLoss(), chunk_size=4, recover_oom=True)(queries, docs)


def test_two_ranks_agree_to_run_the_step_again_when_one_runs_out_of_memory():
    """Rank 1 alone fails, in pass 1 and then in pass 2: both ranks halve, run the step again,
    and end with the gradients of a run at the final budget (DDP, dropout on)."""
    output = run_torchrun("adaptive_ddp.py")
    results = [json.loads(line.removeprefix("RESULT ")) for line in output.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 2, output[-3000:]
    for result in results:
        assert [c[3] for c in result["changes"]] == ["pass 1", "pass 2"], result
        assert result["grad_diff"] == 0.0 and result["loss_diff"] == 0.0, result


def test_an_embedding_batch_that_runs_out_of_memory_is_split():
    calls = []

    def embed(texts):
        calls.append(len(texts))
        if len(texts) > 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return torch.tensor([[float(len(t))] for t in texts])

    out = split_on_oom(embed, torch.device("cpu"))(["a", "bb", "ccc", "dddd", "eeeee", "f", "gg"])
    assert out.squeeze(1).tolist() == [1, 2, 3, 4, 5, 1, 2] and max(calls) == 7
    with pytest.raises(RuntimeError, match="can't allocate"):
        split_on_oom(lambda texts: embed(["x"] * 9), torch.device("cpu"))(["only one"])


# ------------------------------------------------------------------- real out-of-memory


def test_a_real_allocation_failure_halves_the_budget_and_gives_the_smaller_budgets_step():
    proc = limited("limited_step.py", "250", "classic")
    results = [json.loads(line.removeprefix("RESULT ")) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = results[0]
    assert result["changes"] and result["budget"] < 256 * 64, result  # the limit did bite
    assert "can't allocate memory" in proc.stdout
    # The same chunks and generator states as the reference: the same arithmetic, bit for bit.
    assert result["grad_diff"] == 0.0 and result["loss_diff"] == 0.0 and result["generator_diff"] == 0.0, result


def test_kept_graphs_stay_within_a_real_memory_limit_and_change_nothing():
    """The auto budget under the same address-space limit: some graphs kept, the step finishes
    (falling back to fewer kept graphs where the limit bites), with the gradients of the step that
    re-embeds every chunk. Kept and re-embedded chunks run the same kernels on the same inputs and
    generator states, so the arithmetic is the same, bit for bit."""
    proc = limited("limited_step.py", "250", "kept", "2048")
    results = [json.loads(line.removeprefix("RESULT ")) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = results[0]
    assert 0 < result["kept_chunks"] < result["chunks"], result  # memory held some graphs, not all
    assert result["grad_diff"] == 0.0 and result["loss_diff"] == 0.0 and result["generator_diff"] == 0.0, result


@pytest.fixture(scope="module")
def long_texts(tmp_path_factory):
    """Documents of 60 words (62 tokens) and a wider tiny BERT (hidden 256): a batch of 256 such
    documents needs several hundred MB of activations, a chunk of 16 about 25."""
    import random

    root = tmp_path_factory.mktemp("long")
    rng = random.Random(0)
    rows = [{"query": " ".join(rng.sample(WORDS, 3)), "positive": " ".join(rng.choices(WORDS, k=60))} for _ in range(512)]
    model = write_tiny_model(root / "model", hidden_size=256, num_attention_heads=4, intermediate_size=1024, max_position_embeddings=128)
    return {"root": root, "train": write_jsonl(root / "train.jsonl", rows), "model": model}


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_auto_run_under_a_memory_limit_completes_with_a_small_fixed_chunks_losses(long_texts, tmp_path):
    common = [f"model.name_or_path={long_texts['model']}", f"data.train={long_texts['train']}", "data.batch_size=256",
              "model.query_max_length=64", "model.doc_max_length=64", "trainer.max_steps=3", "trainer.lr=1e-3",
              "eval.data=null", "wandb.mode=disabled", "trainer.log_every=1"]
    fixed = tmp_path / "fixed"
    run_trainer(fixed, *common, "grad_cache.chunk_size=16")
    auto = tmp_path / "auto"
    env = dict(os.environ, PYTHONPATH=str(REPO), **LIMITED_ENV)
    cmd = [sys.executable, str(REPO / "tests" / "memory_scripts" / "limited_trainer.py"), "300",
           f"hydra.run.dir={auto}", *common, "grad_cache.chunk_tokens=auto"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probed = next(line for line in proc.stdout.splitlines() if line.startswith("grad_cache: "))
    rows = int(probed.split()[1])
    assert 1 <= rows < 256, probed  # the whole batch did not fit under the limit
    records = [json.loads(line) for line in (auto / "metrics.jsonl").read_text().splitlines()]
    assert all(r["chunk_tokens"] <= rows * 64 for r in records) and "data_wait_s" in records[0]
    # Other chunks, other matmul shapes: equal up to the rounding of 3 updates.
    reference = _losses(fixed)
    torch.testing.assert_close(_losses(auto), reference, atol=rounding_atol(3, max(reference)), rtol=0)


def test_the_tools_take_batch_size_auto(tmp_path):
    """trainer.evaluate with batch_size=auto probes a batch, says so, and scores as batch_size=4."""
    from tests.tiny import synthetic_pairs, write_beir

    model = write_tiny_model(tmp_path / "model")
    dev = write_beir(tmp_path / "dev", synthetic_pairs(30, seed=2))
    outputs, said = {}, {}
    for size in ("auto", "4"):
        out = tmp_path / f"eval-{size}.json"
        said[size] = run_trainer(tmp_path / f"run-{size}", f"model={model}", f"data={dev}", f"batch_size={size}",
                                 f"output={out}", module="trainer.evaluate").stdout
        outputs[size] = json.loads(out.read_text())
    assert "batch_size: " in said["auto"] and "texts of 64 tokens per forward" in said["auto"]  # the tiny model has 64 positions
    assert "batch_size: " not in said["4"]
    # Other batches pad texts differently: scores equal up to fp32 rounding of the embeddings,
    # far below what moves a rank (a tie broken otherwise moves NDCG by ~1e-2).
    for key, value in outputs["4"].items():
        assert abs(outputs["auto"][key] - value) < 1e-6, key
