"""LoRA (peft): only the adapters train, the export is the merged model plus the adapter, and
2 DDP ranks, ZeRO-1, -2 or -3 give the losses (and ZeRO-3 the export) of one rank."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import assets, common, losses  # noqa: F401 (assets is a fixture)
from tests.tiny import assert_sentence_transformers_matches_encoder, rounding_atol, run_trainer, tiny_encoder
from trainer.core.lora import merged_state_dict

LORA = ("model.lora.r=4", "model.lora.alpha=8", "trainer.lr=1e-2")


def tiny_backbone(family: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2Model, Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    if family == "qwen3":
        return Qwen3Model(Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    if family == "gpt2":  # Conv1D layers: peft merges them transposed (fan_in_fan_out)
        return GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    return tiny_encoder().backbone


@pytest.mark.parametrize("family,dtype", [("bert", torch.float32), ("qwen3", torch.float32), ("gpt2", torch.float32),
                                          ("qwen3", torch.bfloat16)])
def test_merging_a_gathered_state_dict_equals_peft_merge(family, dtype):
    """What the ZeRO-3 export computes from the gathered weights is what merge_and_unload() gives,
    with the wrapped model's own parameter names."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_backbone(family).to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                   fan_in_fan_out=family == "gpt2"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would leave nothing to merge
                parameter.normal_()
    merged = merged_state_dict(model, model.state_dict())
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else {}  # bf16: one rounding apart at most
    for name, value in expected.items():
        assert merged[name].dtype == value.dtype
        torch.testing.assert_close(merged[name], value, **tolerance)
    before = tiny_backbone(family).to(dtype).state_dict()
    assert sum(not torch.equal(merged[name], before[name]) for name in before) >= 4  # the adapters were merged


def test_an_adapter_the_export_cannot_merge_is_refused_by_name_before_training():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings \(Embedding\) is not a linear layer"):
        encoder.add_lora(r=4, alpha=8, target_modules=["query", "word_embeddings"])


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
    # Two ranks sum their halves of the gradient where one rank sums it whole: rounding apart,
    # through 3 updates.
    reference = losses(one_rank)
    torch.testing.assert_close(losses(run_dir), reference, atol=rounding_atol(3, max(reference)), rtol=0)


@pytest.mark.parametrize("stage", [1, 2])
def test_lora_under_zero1_and_zero2_equals_one_rank(assets, one_rank, tmp_path, stage):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *lora_args(assets, "trainer.backend=deepspeed", f"deepspeed.zero_stage={stage}"), nproc=2)
    torch.testing.assert_close(losses(run_dir), losses(one_rank), atol=1e-5, rtol=0)
    assert_sentence_transformers_matches_encoder(run_dir / "model")


def test_lora_under_zero3_resumed_equals_one_rank_and_exports_the_same_merged_model(assets, one_rank, tmp_path):
    """ZeRO-3 partitions the frozen weights and the adapters alike: the export gathers them layer
    by layer and merges on rank 0, which must give the weights peft's merge gives one rank."""
    pytest.importorskip("deepspeed")
    # Nothing kept whole: the tiny model's tensors are all under DeepSpeed's default persistence
    # threshold, which would leave them unpartitioned and the gathering untested.
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    zero3_args = lora_args(assets, "trainer.backend=deepspeed", f"deepspeed.config={zero3}")
    run_dir = tmp_path / "run"
    # Stopped and resumed on the way: the frozen shards come back from the pretrained weights,
    # the adapters' from DeepSpeed's checkpoint.
    run_trainer(run_dir, *zero3_args, "trainer.stop_after_step=2", nproc=2)
    proc = run_trainer(run_dir, *zero3_args, nproc=2)
    assert f"resuming from {run_dir}/checkpoints/step-2 (step 2)" in proc.stdout
    torch.testing.assert_close(losses(run_dir), losses(one_rank), atol=1e-5, rtol=0)
    sharded, plain = load_file(run_dir / "model" / "model.safetensors"), load_file(one_rank / "model" / "model.safetensors")
    assert sharded.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(sharded[name], plain[name], atol=1e-5, rtol=0)
    adapter = load_file(run_dir / "model" / "adapter" / "adapter_model.safetensors")
    one_rank_adapter = load_file(one_rank / "model" / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == one_rank_adapter.keys() and adapter
    for name in adapter:
        torch.testing.assert_close(adapter[name], one_rank_adapter[name], atol=1e-5, rtol=0)
    assert_sentence_transformers_matches_encoder(run_dir / "model")


def test_lora_stopped_and_resumed_equals_the_uninterrupted_run(assets, one_rank, tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *lora_args(assets, "trainer.stop_after_step=2"))
    proc = run_trainer(run_dir, *lora_args(assets))
    assert f"resuming from {run_dir}/checkpoints/step-2 (step 2)" in proc.stdout
    torch.testing.assert_close(losses(run_dir), losses(one_rank), atol=1e-6, rtol=0)
    resumed, plain = load_file(run_dir / "model" / "model.safetensors"), load_file(one_rank / "model" / "model.safetensors")
    for name in plain:
        torch.testing.assert_close(resumed[name], plain[name], atol=1e-6, rtol=0)
