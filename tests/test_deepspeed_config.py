"""The DeepSpeed config rules (trainer/run/deepspeed_config.py): Hydra keys, a JSON file and
accelerate launch's flags merge, and every contradiction is one error naming where it is."""

from __future__ import annotations

import json

import pytest

from trainer.run.deepspeed_config import DeepSpeedConfigError, build_config, offloads_optimizer, resolve_backend


def build(config_file=None, environ=None, **overrides):
    kwargs = dict(
        zero_stage=None, offload_optimizer=None, config_file=config_file, micro_batch_size=8, world_size=2,
        max_grad_norm=1.0, precision="fp32", environ=environ or {},
    )
    kwargs.update(overrides)
    return build_config(**kwargs)


def write(tmp_path, config: dict, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config, indent=2))
    return str(path)


def test_defaults_are_stage_2_without_offload_and_the_trainers_batch():
    config = build()
    assert config["zero_optimization"] == {"stage": 2}
    assert not offloads_optimizer(config)
    assert config["train_batch_size"] == 16
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 1.0


def test_hydra_keys_set_stage_and_offload():
    config = build(zero_stage=3, offload_optimizer=True)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offloads_optimizer(config)


def test_the_files_other_settings_are_kept_and_auto_is_accepted(tmp_path):
    path = write(tmp_path, {
        "train_batch_size": "auto",
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": True},
        "wall_clock_breakdown": True,
    })
    config = build(path)
    assert config["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": True}
    assert config["wall_clock_breakdown"] is True
    assert config["train_batch_size"] == 16


def test_the_file_and_hydra_agreeing_is_fine_and_disagreeing_is_an_error(tmp_path):
    path = write(tmp_path, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    assert build(path, zero_stage=3, offload_optimizer=True)["zero_optimization"]["stage"] == 3
    with pytest.raises(DeepSpeedConfigError, match=r"deepspeed.zero_stage = 1, .*ds.json: line 3: \"stage\" = 3"):
        build(path, zero_stage=1)
    with pytest.raises(DeepSpeedConfigError, match=r"optimizer offload .*deepspeed.offload_optimizer = false"):
        build(path, offload_optimizer=False)


def test_accelerate_launch_flags_count_as_a_source():
    environ = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}
    config = build(environ=environ)
    assert config["zero_optimization"]["stage"] == 3 and offloads_optimizer(config)
    with pytest.raises(DeepSpeedConfigError, match="accelerate launch --zero_stage = 3"):
        build(environ=environ, zero_stage=2)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"gradient_accumulation_steps": 4}, r"line 2: \"gradient_accumulation_steps\": .* is 4, .*GradCache"),
        ({"train_batch_size": 64}, r"\"train_batch_size\": train_batch_size is 64, but the trainer uses 16; set data.batch_size"),
        ({"gradient_clipping": 0.5}, r"set trainer.max_grad_norm"),
        ({"optimizer": {"type": "Adam"}}, r"line 2: \"optimizer\": remove"),
        ({"scheduler": {"type": "WarmupLR"}}, r"\"scheduler\": remove"),
        ({"bf16": {"enabled": True}}, r"\"bf16\": bf16.enabled must be false .*trainer.precision"),
        ({"zero_optimization": {"stage": 0}}, r"must be 1, 2 or 3"),
    ],
)
def test_settings_the_trainer_owns_are_errors_naming_file_line_and_key(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(DeepSpeedConfigError, match=message) as err:
        build(path)
    assert "ds.json" in str(err.value) or "stage" in str(err.value)


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="missing.json: DeepSpeed config file not found"):
        build(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(DeepSpeedConfigError, match=r"broken.json: line 2: not valid JSON"):
        build(str(broken))


def test_fp16_is_refused():
    with pytest.raises(DeepSpeedConfigError, match="fp16 is not supported"):
        build(precision="fp16")
    assert build(precision="bf16")["zero_optimization"]["stage"] == 2


def test_backend_follows_the_key_else_accelerate():
    assert resolve_backend(None, "fp32", {}) == "ddp"
    assert resolve_backend("deepspeed", "fp32", {}) == "deepspeed"
    assert resolve_backend(None, "fp32", {"ACCELERATE_USE_DEEPSPEED": "true"}) == "deepspeed"
    with pytest.raises(DeepSpeedConfigError, match="trainer.backend=ddp, but `accelerate launch --use_deepspeed`"):
        resolve_backend("ddp", "fp32", {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(DeepSpeedConfigError, match="--mixed_precision bf16 disagrees with trainer.precision=fp32"):
        resolve_backend(None, "fp32", {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert resolve_backend(None, "bf16", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == "ddp"
