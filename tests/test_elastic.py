"""A worker killed under torchrun --max-restarts (the group restarts and resumes from the last
verified checkpoint, to the model an uninterrupted run ends with), the restarted group's
rendezvous, and two torchrun "nodes" on this machine through launch/slurm_node.sh."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_preemption import wait_for_step
from tests.test_train import assets, common, losses, metrics  # noqa: F401 (assets is a fixture)
from tests.tiny import REPO, run_trainer, trainer_command

STEPS = 16


def run_args(assets) -> list[str]:
    return common(assets, "data.batch_size=16", f"trainer.max_steps={STEPS}", "eval.data=null", "wandb.mode=disabled",
                  "checkpoint.every=2")


@pytest.fixture(scope="module")
def one_node(assets, tmp_path_factory):
    """The uninterrupted run: one torchrun, two ranks."""
    run_dir = tmp_path_factory.mktemp("one-node") / "run"
    run_trainer(run_dir, *run_args(assets), nproc=2)
    return run_dir


def assert_same_model(run_dir: Path, reference: Path) -> None:
    ours, theirs = load_file(run_dir / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_kill_9_of_a_worker_restarts_the_group_which_resumes_to_the_same_model(assets, one_node, tmp_path):
    run_dir = tmp_path / "run"
    _, env = trainer_command([], ())
    env.update(NPROC_PER_NODE="2", MAX_RESTARTS="2")
    proc = subprocess.Popen([str(REPO / "launch" / "torchrun.sh"), f"hydra.run.dir={run_dir}", *run_args(assets)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 5, proc)
    workers = children(proc.pid)  # launch/torchrun.sh execs torchrun, whose children are the workers
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)  # as the OOM killer would
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-4000:]

    resumed = [line for line in output.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1 and f"{run_dir}/checkpoints/step-" in resumed[0], output[-4000:]
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    torch.testing.assert_close(losses(run_dir), losses(one_node), atol=1e-6, rtol=0)
    assert_same_model(run_dir, one_node)


def rendezvous_after_restart(tmp_path: Path, join: str) -> subprocess.CompletedProcess:
    """tests/dist_scripts/elastic_worker.py under torchrun --max-restarts=1: rank 0 dies in attempt 0 and
    comes back 15 s late in attempt 1 (a busy machine), longer than Gloo retries a refused connect."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", JOIN=join, LATE_RANK="0", LATE_S="15")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # torchrun's default: one store for all attempts
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "tests.dist_scripts.elastic_worker"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def test_a_restarted_group_does_not_read_the_addresses_of_the_one_before(tmp_path):
    """Joining with plain tcp:// instead (JOIN=raw) failed here in 3 of 4 tries ("Gloo
    connectFullMesh failed ... Connection refused", or a hang); a stale address that works is
    one whose port the new attempt happened to reuse, so that cannot be a test of its own."""
    proc = rendezvous_after_restart(tmp_path, join="trainer")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attempt 1 rank 0: all_reduce gave 2" in proc.stdout and "attempt 1 rank 1: all_reduce gave 2" in proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_slurm_node_sh_give_the_losses_of_one_node(assets, one_node, tmp_path):
    run_dir = tmp_path / "run"
    _, env = trainer_command([], ())
    job = dict(env, SLURM_JOB_ID=str(os.getpid()), SLURM_NNODES="2", SLURM_JOB_NODELIST="127.0.0.1",
               MASTER_PORT=str(free_port()), NPROC_PER_NODE="1")
    nodes = [
        subprocess.Popen([str(REPO / "launch" / "slurm_node.sh"), f"hydra.run.dir={run_dir}", *run_args(assets)],
                         cwd=tmp_path, env=dict(job, SLURM_NODEID=str(node)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sum(o.count("over 2 rank(s)") for o in outputs) == 1  # one job of two ranks, rank 0 speaking
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    torch.testing.assert_close(losses(run_dir), losses(one_node), atol=1e-6, rtol=0)
    assert_same_model(run_dir, one_node)
