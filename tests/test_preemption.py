"""A stop signal mid-run: every rank checkpoints at one agreed step and exits; the same command
then resumes and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_train import assets, common, losses, metrics  # noqa: F401 (assets is a fixture)
from tests.tiny import run_trainer, trainer_command

STEPS = 40


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{proc.stdout.read()}")
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_sigterm_to_torchrun_checkpoints_at_an_agreed_step_and_resumes(assets, tmp_path):
    args = common(assets, "data.batch_size=16", f"trainer.max_steps={STEPS}", "wandb.mode=disabled", "eval.data=null")
    reference = tmp_path / "uninterrupted"
    run_trainer(reference, *args, nproc=2)  # same world size: the reduction order, hence the weights, match

    run_dir = tmp_path / "preempted"
    cmd, env = trainer_command([f"hydra.run.dir={run_dir}"], tuple(args), nproc=2)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    output = proc.communicate(timeout=120)[0]

    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    stopped_at = int(checkpoint.name.removeprefix("step-"))
    assert 3 <= stopped_at < STEPS, output
    assert output.count(f"stopped after step {stopped_at} on a stop signal") == 1, output
    assert {p.name for p in checkpoint.iterdir()} >= {"rng-rank0.pt", "rng-rank1.pt", "model.pt"}
    assert not (run_dir / "model").exists()

    run_trainer(run_dir, *args, nproc=2)
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    torch.testing.assert_close(losses(run_dir), losses(reference), atol=1e-6, rtol=0)
    resumed, uninterrupted = load_file(run_dir / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0)


def test_stop_request_records_and_hands_the_signal_over(monkeypatch):
    import os

    from trainer.run.preemption import StopRequest

    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        request = StopRequest()
        assert not request.agreed()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert request.agreed() and request.received == signal.SIGUSR2
        assert seen == []  # recorded only: nothing happens before the checkpoint
        request.hand_over()
        assert seen == [signal.SIGUSR2]  # then the earlier handler (submitit's requeue) runs
    finally:
        signal.signal(signal.SIGUSR2, previous)
