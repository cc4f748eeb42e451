"""slurm/train.sbatch on a real single-node Slurm cluster (slurm/local-cluster.sh), CPU only:
a 2-rank torchrun job, the same with one Slurm task per rank, and a job warned mid-run that
checkpoints at one agreed step, requeues itself, resumes and ends like an uninterrupted job.

CI installs Slurm (.ci/run); on a machine without it these tests are skipped, except under CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import assets, common, losses, metrics  # noqa: F401 (assets is a fixture)
from tests.tiny import REPO

STEPS = 40


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        if os.environ.get("CI"):
            pytest.fail("Slurm is not installed: .ci/run should have installed it")
        pytest.skip("Slurm is not installed (apt-get install slurmctld slurmd munge slurm-client)")
    subprocess.run(["bash", str(REPO / "slurm" / "local-cluster.sh")], check=True, timeout=120)


def submit(workdir: Path, args: list[str], *sbatch_options: str, env_extra: dict | None = None) -> str:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", NPROC_PER_NODE="2", **(env_extra or {}))
    cmd = ["sbatch", "--parsable", "--cpus-per-task=2", f"--output={workdir}/slurm-%j.out", *sbatch_options,
           str(REPO / "slurm" / "train.sbatch"), *args]
    return subprocess.run(cmd, cwd=workdir, env=env, check=True, capture_output=True, text=True).stdout.strip()


def job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def wait_until_done(job_id: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if state == "PENDING" and job_field(job_id, "Reason") == "BeginTime":
            # Slurm holds a requeued job for a while (its requeue delay); let it start now.
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s (state {job_field(job_id, 'JobState')})")


def job_output(workdir: Path, job_id: str) -> str:
    return (workdir / f"slurm-{job_id}.out").read_text().replace("\r", "\n")


def args_for(assets, steps: int) -> list[str]:
    return common(assets, "data.batch_size=16", f"trainer.max_steps={steps}", "eval.data=null")


@pytest.fixture(scope="module")
def uninterrupted(slurm, assets, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm-plain")
    job = submit(workdir, args_for(assets, STEPS))
    assert wait_until_done(job) == "COMPLETED", job_output(workdir, job)
    return workdir / "runs" / f"slurm-{job}", job_output(workdir, job)


def test_sbatch_two_rank_torchrun_job_completes(uninterrupted):
    run_dir, output = uninterrupted
    assert "over 2 rank(s)" in output
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert (run_dir / "model" / "modules.json").exists()
    assert (run_dir / "wandb.json").exists()


def test_one_slurm_task_per_rank_without_torchrun(slurm, assets, tmp_path):
    job = submit(tmp_path, args_for(assets, 4), "--ntasks-per-node=2", "--cpus-per-task=1",
                 env_extra={"LAUNCH_MODE": "tasks"})
    assert wait_until_done(job) == "COMPLETED", job_output(tmp_path, job)
    output = job_output(tmp_path, job)
    assert output.count("over 2 rank(s)") == 1  # two ranks, one speaking
    assert [m["step"] for m in metrics(tmp_path / "runs" / f"slurm-{job}")] == [1, 2, 3, 4]


def test_warned_job_checkpoints_requeues_and_resumes_like_an_uninterrupted_job(uninterrupted, assets, tmp_path):
    reference, _ = uninterrupted
    job = submit(tmp_path, args_for(assets, STEPS))
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    deadline = time.time() + 180
    while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3):
        assert time.time() < deadline and job_field(job, "JobState") in ("PENDING", "RUNNING"), job_output(tmp_path, job)
        time.sleep(0.2)
    # What Slurm's --signal=B:USR1@120 does before the time limit: USR1 to the batch script.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    assert wait_until_done(job) == "COMPLETED", job_output(tmp_path, job)

    output = job_output(tmp_path, job)
    stopped = re.findall(r"stopped after step (\d+) on a stop signal", output)
    assert len(stopped) == 1 and 3 <= int(stopped[0]) < STEPS, output
    assert f"resuming from {run_dir}/checkpoints/step-{stopped[0]} (step {stopped[0]})" in output
    assert job_field(job, "Restarts") == "1"
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    torch.testing.assert_close(losses(run_dir), losses(reference), atol=1e-6, rtol=0)
    resumed, plain = load_file(run_dir / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    for name in plain:
        torch.testing.assert_close(resumed[name], plain[name], atol=1e-6, rtol=0)
