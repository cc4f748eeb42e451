"""Faults the trainer survives: broken checkpoints, a full disk, non-finite steps, tampered files
and models that ship code. (Killed workers and two nodes: tests/test_elastic.py.)"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import assets, common, losses, metrics  # noqa: F401 (assets is a fixture)
from tests.tiny import REPO, run_trainer, write_tiny_model
from trainer.run import checkpoint
from trainer.run import manifest
from trainer.run import safe_load


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


# -- verified checkpoints ------------------------------------------------------------------------


def fake_backend(payload: bytes):
    def save_state(folder: Path) -> None:
        (folder / "model.pt").write_bytes(payload)
        (folder / "shards").mkdir(exist_ok=True)
        (folder / "shards" / "part-0.pt").write_bytes(payload[::-1])

    return save_state


def save_steps(run_dir: Path, steps: list[int], keep: int = 10) -> None:
    for step in steps:
        checkpoint.save(run_dir, checkpoint.TrainerState(step=step), fake_backend(os.urandom(4096)), keep=keep)


def test_save_writes_a_manifest_that_verifies(tmp_path):
    save_steps(tmp_path, [1])
    folder = tmp_path / "checkpoints" / "step-1"
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(listed) == {"model.pt", "shards/part-0.pt", "rng-rank0.pt", "trainer_state.json"}
    assert listed["model.pt"]["size"] == 4096
    assert manifest.problem(folder) is None


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda f: f.joinpath("model.pt").write_bytes(f.joinpath("model.pt").read_bytes()[:2048]),
         "model.pt is 2048 bytes, the manifest says 4096"),
        (lambda f: f.joinpath("shards", "part-0.pt").unlink(), "shards/part-0.pt is missing"),
        (lambda f: f.joinpath("model.pt").write_bytes(bytes(4096)), "model.pt does not match its SHA-256"),
        (lambda f: f.joinpath("manifest.json").unlink(), "no manifest.json"),
    ],
    ids=["truncated", "missing", "changed", "no-manifest"],
)
def test_latest_skips_a_broken_checkpoint_with_one_line_and_moves_it_aside(tmp_path, damage, reason):
    save_steps(tmp_path, [2, 4])
    damage(tmp_path / "checkpoints" / "step-4")
    said = []
    assert checkpoint.latest(tmp_path, say=said.append) == tmp_path / "checkpoints" / "step-2"
    assert len(said) == 1 and reason in said[0] and "step-4" in said[0], said
    assert (tmp_path / "checkpoints" / "broken-step-4").is_dir()  # kept for a look, not counted
    assert checkpoint.latest(tmp_path, say=said.append) == tmp_path / "checkpoints" / "step-2"
    assert len(said) == 1


def test_keep_never_deletes_the_last_verified_checkpoint(tmp_path):
    save_steps(tmp_path, [2, 4, 6], keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-6"]
    # A newer folder that is not verified (e.g. copied back by hand) neither counts nor is deleted,
    # and the checkpoint just written, the newest verified, stays.
    save_steps(tmp_path, [8], keep=2)
    (tmp_path / "checkpoints" / "step-8" / "manifest.json").unlink()
    save_steps(tmp_path, [7], keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-7", "step-8"]
    assert checkpoint.latest(tmp_path, say=lambda _: None) == tmp_path / "checkpoints" / "step-7"


def test_a_failing_save_leaves_the_previous_checkpoint_intact(tmp_path):
    save_steps(tmp_path, [2], keep=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step-2").iterdir() if p.is_file()}

    def disk_full(folder: Path) -> None:
        (folder / "model.pt").write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "optimizer.pt"))

    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.save(tmp_path, checkpoint.TrainerState(step=4), disk_full, keep=1)
    message = str(caught.value)
    assert "No space left on device" in message and "step-2 is intact" in message and "step-4" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]  # no step-4.tmp left
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step-2").iterdir() if p.is_file()}
    assert after == before
    assert checkpoint.latest(tmp_path, say=print) == tmp_path / "checkpoints" / "step-2"


def test_trainer_resumes_from_the_checkpoint_before_a_truncated_one(assets, tmp_path):
    args = common(assets, "data.batch_size=16", "trainer.max_steps=8", "eval.data=null", "wandb.mode=disabled",
                  "checkpoint.every=2", "checkpoint.keep=3")
    reference = tmp_path / "uninterrupted"
    run_trainer(reference, *args)
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *args, "trainer.stop_after_step=6")
    optimizer = run_dir / "checkpoints" / "step-6" / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[: size // 2])  # the disk filled up mid-write

    proc = run_trainer(run_dir, *args)
    assert f"{run_dir}/checkpoints/step-6 is broken (optimizer.pt is {size // 2} bytes, the manifest says {size})" in proc.stdout
    assert f"resuming from {run_dir}/checkpoints/step-4 (step 4)" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 9))
    torch.testing.assert_close(losses(run_dir), losses(reference), atol=1e-6, rtol=0)
    resumed, plain = load_file(run_dir / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert_same_tensors(resumed, plain)


# -- non-finite steps ----------------------------------------------------------------------------


def faulty_run(run_dir: Path, args: list[str], fault: str, steps: str, rank: str = "", nproc: int = 2, expect_ok=True):
    env = {"FAULT": fault, "FAULT_STEPS": steps, "FAULT_RANK": rank}
    return run_trainer(run_dir, *args, nproc=nproc, module="tests.dist_scripts.faulty_trainer", env_extra=env,
                       expect_ok=expect_ok)


def step_args(assets, steps: int, *extra: str) -> list[str]:
    return common(assets, "data.batch_size=16", f"trainer.max_steps={steps}", "eval.data=null", "wandb.mode=disabled",
                  "checkpoint.every=1", "checkpoint.keep=100", "trainer.warmup_steps=0", *extra)


def test_nan_loss_on_one_rank_skips_the_update_on_every_rank(assets, tmp_path):
    run_dir = tmp_path / "run"
    proc = faulty_run(run_dir, step_args(assets, 5), "nan_loss", "3", rank="1")
    assert proc.stdout.count("non-finite") == 1, proc.stdout
    assert "step 3: non-finite loss; the update was skipped on every rank (1 in a row, 1 in all)" in proc.stdout
    records = metrics(run_dir)
    assert [m["skipped_steps"] for m in records] == [0, 0, 1, 1, 1]
    assert records[3]["lr"] == records[2]["lr"] < records[1]["lr"]  # the (decaying) schedule waited too
    ckpt = run_dir / "checkpoints"
    assert_same_tensors(weights(ckpt / "step-3"), weights(ckpt / "step-2"))  # no update at all...
    optimizer_2, optimizer_3 = (torch.load(ckpt / f"step-{s}" / "optimizer.pt", weights_only=True) for s in (2, 3))
    assert optimizer_3["state"][0]["step"] == optimizer_2["state"][0]["step"]  # ...not even to AdamW's moments
    assert not torch.equal(weights(ckpt / "step-4")["backbone.embeddings.word_embeddings.weight"],
                           weights(ckpt / "step-3")["backbone.embeddings.word_embeddings.weight"])
    assert all(torch.isfinite(t).all() for t in weights(ckpt / "step-5").values())


def test_inf_gradients_in_a_row_stop_the_run_with_the_last_checkpoint_intact(assets, tmp_path):
    run_dir = tmp_path / "run"
    proc = faulty_run(run_dir, step_args(assets, 8, "trainer.max_bad_steps=3"), "inf_grad", "2,3,4", rank="0",
                      expect_ok=False)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "error: 3 steps in a row (up to step 4) had a non-finite loss or gradient norm" in proc.stderr
    assert f"its last checkpoint, {run_dir}/checkpoints/step-3, is as it was" in proc.stderr
    assert "step 2: non-finite gradient norm" in proc.stdout
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1", "step-2", "step-3"]
    assert manifest.problem(ckpt / "step-3") is None
    assert_same_tensors(weights(ckpt / "step-3"), weights(ckpt / "step-1"))
    assert not (run_dir / "model").exists()
    assert json.loads((ckpt / "step-3" / "trainer_state.json").read_text())["bad_steps_in_a_row"] == 2


def test_fp16_overflow_is_the_scalers_business_not_a_bad_step(assets, tmp_path):
    run_dir = tmp_path / "run"
    args = step_args(assets, 3, "trainer.precision=fp16", "trainer.max_bad_steps=1")
    proc = faulty_run(run_dir, args, "inf_grad", "2", nproc=1)
    assert "non-finite" not in proc.stdout
    assert [m["skipped_steps"] for m in metrics(run_dir)] == [0, 0, 0]
    ckpt = run_dir / "checkpoints"
    assert_same_tensors(weights(ckpt / "step-2"), weights(ckpt / "step-1"))  # GradScaler skipped it...
    scale = [torch.load(ckpt / f"step-{s}" / "scaler.pt", weights_only=True)["scale"] for s in (1, 2)]
    assert scale[1] == scale[0] / 2  # ...and lowered its scale


def test_deepspeed_skips_a_nan_step_once_without_counting_it_twice(assets, tmp_path):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    args = step_args(assets, 3, "trainer.backend=deepspeed", "deepspeed.zero_stage=2", "checkpoint.keep=100")
    proc = faulty_run(run_dir, args, "nan_loss", "2", rank="1")
    assert proc.stdout.count("non-finite loss") == 1, proc.stdout
    assert [m["skipped_steps"] for m in metrics(run_dir)] == [0, 1, 1]
    states = [torch.load(run_dir / "checkpoints" / f"step-{s}" / "deepspeed" / "mp_rank_00_model_states.pt",
                         weights_only=False) for s in (1, 2, 3)]
    assert_same_tensors(states[1]["module"], states[0]["module"])
    assert states[1]["skipped_steps"] == 1  # DeepSpeed's own count agrees
    assert not torch.equal(states[2]["module"]["backbone.embeddings.word_embeddings.weight"],
                           states[1]["module"]["backbone.embeddings.word_embeddings.weight"])


# -- safe loading --------------------------------------------------------------------------------


class Payload:
    """Unpickling it runs a command: what a tampered checkpoint file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_tampered_pickle_in_a_checkpoint_is_refused_and_never_runs(assets, tmp_path):
    args = common(assets, "data.batch_size=16", "trainer.max_steps=4", "eval.data=null", "wandb.mode=disabled")
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *args, "trainer.stop_after_step=2")
    folder = run_dir / "checkpoints" / "step-2"
    marker = tmp_path / "payload-ran"
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, folder / "optimizer.pt")
    manifest.write(folder)  # whoever swapped the file rewrote the manifest too

    proc = run_trainer(run_dir, *args, expect_ok=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {folder}/optimizer.pt: refused to load posix.system: checkpoint files may hold only" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_deepspeed_loading_is_forced_to_weights_only(tmp_path):
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"x": Payload(marker)}, bad)
    with pytest.raises(safe_load.UnsafeCheckpointError, match="refused to load"):
        with safe_load.weights_only_everywhere(tmp_path, []):
            torch.load(bad, weights_only=False)  # what DeepSpeed's checkpoint engine asks for
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def write_model_with_code(folder: Path, marker: Path) -> Path:
    write_tiny_model(folder)
    (folder / "modeling_custom.py").write_text(
        "from pathlib import Path\n"
        "from transformers import BertConfig, BertModel\n"
        f"Path({str(marker)!r}).touch()  # proof that this code ran\n"
        "class CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-bert", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "modeling_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_with_its_own_code_loads_only_when_trusted(assets, tmp_path):
    marker = tmp_path / "code-ran"
    model = write_model_with_code(tmp_path / "custom", marker)
    args = common(assets, "data.batch_size=16", "trainer.max_steps=1", "eval.data=null", "wandb.mode=disabled")
    proc = run_trainer(tmp_path / "refused", *args, f"model.name_or_path={model}", expect_ok=False)
    assert proc.returncode == 2
    assert f"error: {model}/config.json: \"auto_map\" asks to run the model's own code (modeling_custom.py)" in proc.stderr
    assert "model.trust_remote_code=true" in proc.stderr
    assert not marker.exists()

    from trainer.core.model import Encoder

    encoder = Encoder.from_pretrained(str(model), trust_remote_code=True)
    assert type(encoder.backbone).__name__ == "CustomModel" and marker.exists()
