"""LoRA (peft): only the adapters train, the export is the merged model plus the adapter, and
2 DDP ranks or ZeRO-2 give the losses of one rank."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import assets, common, losses  # noqa: F401 (assets is a fixture)
from tests.tiny import assert_sentence_transformers_matches_encoder, run_trainer

LORA = ("model.lora.r=4", "model.lora.alpha=8", "trainer.lr=1e-2")


def lora_args(assets, *extra: str) -> list[str]:
    return common(assets, "data.batch_size=16", "trainer.max_steps=3", "eval.data=null", "wandb.mode=disabled",
                  "grad_cache.chunk_size=5", *LORA, *extra)


@pytest.fixture(scope="module")
def one_rank(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    run_trainer(run_dir, *lora_args(assets))
    return run_dir


def test_only_the_adapters_train_and_the_export_is_the_merged_model(assets, one_rank):
    state = torch.load(one_rank / "checkpoints" / "step-3" / "model.pt", weights_only=True)
    adapters = [k for k in state if "lora_" in k]
    assert adapters and all(k.endswith(".weight") for k in adapters)
    optimizer = torch.load(one_rank / "checkpoints" / "step-3" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(adapters)  # AdamW holds the adapters' moments alone
    # The frozen weights are exactly the pretrained ones.
    original = load_file(assets["model"] / "model.safetensors")
    for name, value in original.items():
        if "pooler" in name:
            continue
        module, leaf = name.rsplit(".", 1)
        key = next(k for k in state if k.endswith(f".{module}.base_layer.{leaf}") or k.endswith(f".{name}"))
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)

    exported = one_rank / "model"
    config = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    merged = load_file(exported / "model.safetensors")
    assert not any("lora" in k for k in merged)
    changed = [k for k in merged if k in original and not torch.equal(merged[k], original[k])]
    assert changed  # the adapters were merged into the weights
    assert_sentence_transformers_matches_encoder(exported)


def test_lora_under_two_ddp_ranks_equals_one_rank(assets, one_rank, tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *lora_args(assets), nproc=2)
    torch.testing.assert_close(losses(run_dir), losses(one_rank), atol=1e-6, rtol=0)


def test_lora_under_zero2_equals_one_rank(assets, one_rank, tmp_path):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *lora_args(assets, "trainer.backend=deepspeed", "deepspeed.zero_stage=2"), nproc=2)
    torch.testing.assert_close(losses(run_dir), losses(one_rank), atol=1e-5, rtol=0)
    assert_sentence_transformers_matches_encoder(run_dir / "model")


def test_lora_with_zero3_is_refused_clearly(assets, tmp_path):
    proc = run_trainer(tmp_path / "run", *lora_args(assets, "trainer.backend=deepspeed", "deepspeed.zero_stage=3"),
                       nproc=2, expect_ok=False)
    assert proc.returncode != 0
    assert "model.lora with DeepSpeed ZeRO-3 is not supported yet" in proc.stderr


def test_lora_stopped_and_resumed_equals_the_uninterrupted_run(assets, one_rank, tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *lora_args(assets, "trainer.stop_after_step=2"))
    proc = run_trainer(run_dir, *lora_args(assets))
    assert f"resuming from {run_dir}/checkpoints/step-2 (step 2)" in proc.stdout
    torch.testing.assert_close(losses(run_dir), losses(one_rank), atol=1e-6, rtol=0)
    resumed, plain = load_file(run_dir / "model" / "model.safetensors"), load_file(one_rank / "model" / "model.safetensors")
    for name in plain:
        torch.testing.assert_close(resumed[name], plain[name], atol=1e-6, rtol=0)
