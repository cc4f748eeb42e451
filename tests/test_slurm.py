"""slurm/train.sbatch on a real single-node Slurm cluster (slurm/local-cluster.sh), CPU only:
a 2-rank torchrun job, the same with one Slurm task per rank, and a job warned mid-run that
checkpoints at one agreed step, requeues itself, resumes and ends like an uninterrupted job.

CI installs Slurm (.ci/run); on a machine without it these tests are skipped, except under CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s (state {job_field(job_id, 'JobState')})")


def job_output(workdir: Path, job_id: str) -> str:
    # The log is read while the job may still write it (the test polls it for a
    # line): a multi-byte character of a progress bar can be cut mid-write, so
    # undecodable bytes are replaced rather than failing the read.
    text = (workdir / f"slurm-{job_id}.out").read_text(errors="replace")
    return text.replace("\r", "\n")


def args_for(assets, steps: int) -> list[str]:
    return common(assets, "data.batch_size=16", f"trainer.max_steps={steps}", "eval.data=null")


@pytest.fixture(scope="module")
def uninterrupted(slurm, assets, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm-plain")
    # CHECK_FIRST: trainer.check on the job's ranks before training (its report beside the log).
    job = submit(workdir, args_for(assets, STEPS), env_extra={"CHECK_FIRST": "1"})
    assert wait_until_done(job) == "COMPLETED", job_output(workdir, job)
    return workdir / "runs" / f"slurm-{job}", job_output(workdir, job)


def test_sbatch_two_rank_torchrun_job_completes(uninterrupted):
    run_dir, output = uninterrupted
    assert "OK: the gather, the chunking and the reduction are exact here" in output
    job = run_dir.name.removeprefix("slurm-")
    report = json.loads((run_dir.parents[1] / f"check-{job}.json").read_text())
    assert report["ok"] and report["world_size"] == 2
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


def launch_sweep(workdir: Path, sweep_dir: Path, args: list[str], *sweep: str) -> subprocess.Popen:
    """`python -m trainer -m hydra/launcher=slurm ...`: one Slurm job of 2 tasks (ranks) per point."""
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "trainer", "-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.max_num_timeout=3", f"hydra.sweep.dir={sweep_dir}",
           *args, *sweep]
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_submitit_sweep_runs_each_point_as_a_two_rank_job_and_summarises(slurm, assets, tmp_path):
    sweep = tmp_path / "sweep"
    args = common(assets, "trainer.max_steps=2")  # with evaluation: the summary tabulates it
    proc = launch_sweep(tmp_path, sweep, args, "loss.temperature=0.05,0.1", "data.batch_size=8,16")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-4000:]
    logs = "".join(p.read_text(errors="replace") for p in (sweep / ".submitit").glob("*/*_log.out"))
    assert logs.count("over 2 rank(s)") == 4  # four Slurm jobs, each of two ranks (one speaking)
    for n in range(4):
        assert [m["step"] for m in metrics(sweep / str(n))] == [1, 2]
        assert json.loads((sweep / str(n) / "wandb.json").read_text())["group"] == "sweep"
    summary = subprocess.run([sys.executable, "-m", "trainer.summary", str(sweep)], capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and "ndcg@10" in rows[0] and all(",," not in row for row in rows[1:])
    assert (sweep / "summary.png").exists()


def test_submitit_job_warned_mid_run_requeues_and_resumes(uninterrupted, assets, tmp_path):
    reference, _ = uninterrupted
    sweep = tmp_path / "sweep"
    proc = launch_sweep(tmp_path, sweep, args_for(assets, STEPS), "loss.temperature=0.05")
    run_dir = sweep / "0"
    deadline = time.time() + 180
    while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    (job,) = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    # What submitit's --signal=USR2@<signal_delay_s> does: USR2 to every task of the job.
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert wait_until_done(job) == "COMPLETED"
    assert proc.wait(timeout=120) == 0
    logs = "".join(p.read_text(errors="replace") for p in (sweep / ".submitit").glob("*/*_0_log.out")).replace("\r", "\n")
    stopped = re.findall(r"stopped after step (\d+) on a stop signal", logs)
    assert len(stopped) == 1 and f"checkpoints/step-{stopped[0]} (step {stopped[0]})" in logs, logs[-3000:]
    assert job_field(job, "Restarts") == "1"  # submitit requeued it
    torch.testing.assert_close(losses(run_dir), losses(reference), atol=1e-6, rtol=0)
