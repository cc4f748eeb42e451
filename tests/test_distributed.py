"""Launcher environments, and the 2-process checks of the loss and GradCache (torchrun + gloo)."""

from __future__ import annotations

import pytest

from tests.tiny import run_torchrun
from trainer.core.distributed import first_host, read_env


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("gpu007", "gpu007"),
        ("gpu[007-010,012]", "gpu007"),
        ("gpu[3,5-6],cpu[1-2]", "gpu3"),
        ("rack[1-2]-node[01-04]", "rack1-node01"),
        ("a1,b2", "a1"),
    ],
)
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_variables():
    env = read_env({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (5, 1, 8, "n1", 1234)
    assert env.launcher == "torchrun"


def test_slurm_variables():
    env = read_env(
        {"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[12-13]",
         "SLURM_JOB_ID": "123456"}
    )
    assert (env.rank, env.local_rank, env.world_size, env.master_addr) == (6, 2, 8, "gpu12")
    assert env.master_port == 20000 + 123456 % 20000
    assert env.launcher == "slurm"


def test_torchrun_wins_over_slurm_under_srun_torchrun():
    env = read_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "9", "WORLD_SIZE": "16"})
    assert (env.rank, env.world_size, env.launcher) == (9, 16, "torchrun")


def test_no_launcher_is_a_single_process():
    env = read_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "none")


def test_two_process_loss_equals_single_process_loss():
    out = run_torchrun("loss_parity.py")
    assert out.count("48 loss configurations match") == 2


def test_two_process_gradcache_equals_single_process_step():
    out = run_torchrun("gradcache_ddp.py")
    assert out.count("gradcache DDP ok") == 2


def test_a_shared_torchrun_store_is_scoped_to_the_restart_attempt():
    import datetime

    import torch.distributed as dist

    from trainer.core.distributed import DistEnv, _attempt_store

    timeout = datetime.timedelta(seconds=10)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    info = DistEnv(rank=0, world_size=2, master_addr="127.0.0.1", master_port=server.port, launcher="torchrun")
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "2"}
    store = _attempt_store(info, timeout, shared)
    store.set("rank_1", "address")
    assert server.get("trainer/attempt-2/rank_1") == b"address"  # attempt 3 will not read it
    # Nothing shared (the launch scripts' TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), or several nodes,
    # whose restart counts need not agree: the plain tcp:// store.
    assert _attempt_store(info, timeout, {**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert _attempt_store(info, timeout, {**shared, "LOCAL_WORLD_SIZE": "1"}) is None
