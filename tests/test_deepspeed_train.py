"""The trainer on DeepSpeed end to end (2 ranks, gloo, tiny BERT, GradCache chunk 3):
`accelerate launch` for both backends with ZeRO-2 equal to DDP, ZeRO-3 with CPU offload resumed
after a stop equal to an uninterrupted run, its exported model whole and loadable in
sentence-transformers, and a checkpoint of the other backend refused clearly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import (
    assert_sentence_transformers_matches_encoder, rounding_atol, run_trainer, synthetic_pairs, write_beir, write_jsonl, write_tiny_model,
)

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds-assets")
    # Stage 3 with nothing kept whole: the tiny model's tensors are all under DeepSpeed's default
    # persistence threshold, which would leave them unpartitioned. Offload comes from the file too.
    zero3 = root / "zero3.json"
    zero3.write_text(json.dumps({
        "train_batch_size": "auto",
        "zero_optimization": {
            "stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 4000,
            "offload_optimizer": {"device": "cpu"},
        },
    }, indent=2))
    return {
        "model": write_tiny_model(root / "model"),
        "train": write_jsonl(root / "train.jsonl", synthetic_pairs(48, seed=1)),
        "dev": write_beir(root / "dev", synthetic_pairs(20, seed=2)),
        "zero3": zero3,
        "root": root,
    }


def common(assets, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={assets['model']}",
        f"data.train=[{assets['train']}]",
        "eval.data=null",
        "wandb.mode=disabled",
        "model.dropout=0.0",
        "trainer.lr=1e-3",
        "trainer.warmup_steps=1",
        "data.batch_size=16",  # 8 pairs per rank
        "grad_cache.chunk_size=3",
        "trainer.max_steps=6",
        *extra,
    ]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def largest_weight(state: dict[str, torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in state.values() if t.is_floating_point())


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def zero3_run(assets, tmp_path_factory):
    """6 uninterrupted steps of ZeRO-3 with the optimizer offloaded (CPU Adam), evaluated."""
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    proc = run_trainer(
        run_dir, *common(assets, "trainer.backend=deepspeed", f"deepspeed.config={assets['zero3']}", f"eval.data={assets['dev']}"),
        nproc=2, timeout=600,
    )
    return run_dir, proc


def test_accelerate_launch_runs_both_backends_and_zero2_equals_ddp(assets, tmp_path):
    ddp_dir, zero2_dir = tmp_path / "ddp", tmp_path / "zero2"
    ddp = run_trainer(ddp_dir, *common(assets), launcher=[*ACCELERATE, "--multi_gpu"])
    # No trainer.backend: accelerate's --use_deepspeed --zero_stage 2 choose it.
    zero2 = run_trainer(zero2_dir, *common(assets), launcher=[*ACCELERATE, "--use_deepspeed", "--zero_stage", "2"])
    assert "over 2 rank(s)" in ddp.stdout and "backend ddp;" in ddp.stdout
    assert "over 2 rank(s)" in zero2.stdout and "backend deepspeed ZeRO-2;" in zero2.stdout
    # ZeRO-2 in fp32 does the DDP path's arithmetic, but AdamW's update runs in its own kernels
    # over flattened partitions: equal up to the update's rounding over the run's 6 steps.
    reference = losses(ddp_dir)
    torch.testing.assert_close(losses(zero2_dir), reference, atol=rounding_atol(6, max(reference)), rtol=0)
    assert_same_weights(weights(zero2_dir), weights(ddp_dir), atol=rounding_atol(6, largest_weight(weights(ddp_dir))))
    initial = load_file(assets["model"] / "model.safetensors")
    assert max(float((weights(ddp_dir)[n] - initial[n]).abs().max()) for n in initial if n in weights(ddp_dir)) > 1e-4


def test_zero3_offload_stopped_and_resumed_equals_uninterrupted(assets, zero3_run, tmp_path):
    full_dir, full = zero3_run
    assert "backend deepspeed ZeRO-3 (optimizer offloaded to cpu)" in full.stdout
    run_dir = tmp_path / "resumed"
    args = common(assets, "trainer.backend=deepspeed", f"deepspeed.config={assets['zero3']}")
    first = run_trainer(run_dir, *args, "trainer.stop_after_step=3", nproc=2)
    assert "stopped after step 3" in first.stdout
    step_3 = run_dir / "checkpoints" / "step-3"
    assert {p.name for p in step_3.iterdir()} >= {"deepspeed", "rng-rank0.pt", "rng-rank1.pt", "trainer_state.json"}
    assert len(list((step_3 / "deepspeed").glob("*optim_states.pt"))) == 2  # one optimizer shard per rank
    assert not list((run_dir / "checkpoints").glob("*.tmp"))

    second = run_trainer(run_dir, *args, nproc=2)
    assert "resuming from" in second.stdout
    torch.testing.assert_close(losses(run_dir), losses(full_dir), atol=1e-6, rtol=0)
    assert_same_weights(weights(run_dir), weights(full_dir), atol=1e-6)


def test_zero3_export_is_the_whole_model_and_loads_in_sentence_transformers(assets, zero3_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir, _ = zero3_run
    exported = weights(run_dir)
    # An independent consolidation: DeepSpeed's own tool, from the final checkpoint's shards.
    shards = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints" / "step-6"), tag="deepspeed")
    from_shards = {k.removeprefix("backbone."): v for k, v in shards.items()}
    trained = {k: v for k, v in exported.items() if not k.startswith("pooler.")}
    assert_same_weights(trained, {k: from_shards[k] for k in trained}, atol=0)
    # The pooler, which training never uses (nor shards), is the base model's as it was loaded.
    base = load_file(assets["model"] / "model.safetensors")
    pooler = {k: v for k, v in exported.items() if k.startswith("pooler.")}
    assert sorted(pooler) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert_same_weights(pooler, {k: base[k] for k in pooler}, atol=0)
    assert exported["embeddings.word_embeddings.weight"].shape == (125, 32)  # whole, not a shard

    assert_sentence_transformers_matches_encoder(run_dir / "model")

    # Evaluation ran on every rank (ZeRO-3 needs all of them for a forward); rank 0 wrote it.
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 6]


def test_resuming_with_the_other_backend_is_a_clear_error(assets, zero3_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(zero3_run[0], run_dir)
    shutil.rmtree(run_dir / "model")
    before = (run_dir / "metrics.jsonl").read_text()
    proc = run_trainer(run_dir, *common(assets, "trainer.backend=ddp"), expect_ok=False)
    assert proc.returncode == 2
    assert "holds no DDP checkpoint (model.pt); was it written with trainer.backend=deepspeed?" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before
