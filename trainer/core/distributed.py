"""Process topology and collectives: who am I (torchrun or Slurm), set-up and teardown, and the
all-gather that keeps gradients.

The gather is the piece the loss depends on for exactness. Its backward is a reduce-scatter of
the SUM of every rank's gradient, so a rank's embeddings receive the gradient of every rank's
loss term that used them. Each rank's loss is the mean over its own rows, and DDP then averages
parameter gradients over the W ranks: the result is exactly the gradient of the mean loss over
the global batch. No factor of W to add or remove anywhere.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# torch 2.13 renamed the functional all-gather; the GPU images still ship 2.11.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, read from the launcher's environment variables."""

    rank: int = 0
    """Global rank, 0 .. world_size - 1."""
    local_rank: int = 0
    """Rank within this node; selects the GPU."""
    world_size: int = 1
    """Number of processes in the job."""
    master_addr: str = "127.0.0.1"
    """Address of rank 0, where the process group rendezvous happens."""
    master_port: int = 29500
    """TCP port of the rendezvous on master_addr."""
    launcher: str = "none"
    """Which variables these came from: 'torchrun', 'slurm' or 'none' (a single process)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list, e.g. 'gpu[007-010,012],cpu1' -> 'gpu007'.

    Parsed here rather than with `scontrol show hostnames` so that it works inside containers
    that do not ship the Slurm client.
    """
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    # Each bracket group holds ranges like '007-010,012'; the first host takes the first value of
    # every group, keeping its zero padding.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first)


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, local rank, world size and rendezvous address from torchrun's variables, else Slurm's.

    torchrun wins when both are present: under `srun torchrun` (one torchrun per node), Slurm's
    SLURM_PROCID is the node's index, not the worker's rank.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        # Every task of one job must agree on the port without talking: derive it from the job id.
        default_port = 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="slurm",
        )
    return DistEnv()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group described by the environment (a no-op for a single process).

    backend defaults to nccl when CUDA is available, gloo otherwise. Returns the DistEnv.
    """
    info = read_env()
    if info.world_size == 1 or dist.is_initialized():
        return info
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _attempt_store(info, timeout)
    dist.init_process_group(
        backend=backend,
        init_method=None if store is not None else f"tcp://{info.master_addr}:{info.master_port}",
        store=store,
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
    )
    return info


def _attempt_store(info: DistEnv, timeout: datetime.timedelta, environ: Mapping[str, str] | None = None):
    """A store whose keys belong to this restart attempt alone, when torchrun shares its own.

    torchrun (c10d rendezvous) hands its workers the agent's TCP store, which lives across
    restarts (--max-restarts). Keys the process group writes there, such as each rank's Gloo
    address, then survive a worker's death: a restarted rank can read its peer's old address
    before the peer has replaced it, and fails with "Gloo connectFullMesh failed ... Connection
    refused" (pytorch/pytorch#135712). Prefixing the keys with the restart count keeps attempts
    apart. The count is per agent, so this is done for a single node only; launch/*.sh set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives every attempt a store of its own on any
    number of nodes. Returns None where nothing is shared (then tcp:// makes a fresh store).
    """
    env = os.environ if environ is None else environ
    if info.launcher != "torchrun" or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(env.get("LOCAL_WORLD_SIZE", -1)) != info.world_size:
        return None  # several nodes: their restart counts need not agree
    shared = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"trainer/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", shared)


def set_timeout(minutes: float) -> None:
    """Change how long the process group's collectives wait (a no-op for a single process).

    The group is joined before the run's config is read (the ranks must agree on the run dir
    first), so the configured timeout is applied afterwards.
    """
    if dist.is_initialized():
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(minutes=minutes))


def teardown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def say(*args) -> None:
    """print on rank 0 only (flushed, so torchrun and Slurm logs interleave in order); the other
    ranks, which do the same work, stay quiet."""
    if is_main():
        print(*args, flush=True)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, keeping the graph back to each rank's own.

    All ranks must pass the same shape. Uses torch's functional collective, whose backward is a
    reduce-scatter (sum); tests/test_distributed.py checks its gradients on gloo.
    """
    if world_size() == 1:
        return tensor
    gathered = _all_gather_autograd(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)
    # Wait now: the loss uses the result at once, and a lazily waited collective that is never
    # touched (e.g. a block that is not in the chosen directions) is reported at exit.
    return funcol.wait_tensor(gathered)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (no autograd; e.g. text hashes)."""
    if world_size() == 1:
        return tensor
    out = tensor.new_empty((world_size() * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_into(out, tensor.contiguous())
    return out


def all_gather_object(obj) -> list:
    """Every rank's picklable obj, in rank order (a collective; for small metadata, e.g. counts)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (a no-op for a single process)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """A reduced copy of `tensor` over ranks, on tensor's device (no autograd; for figures and flags)."""
    if world_size() == 1:
        return tensor.detach().clone()
    # NCCL reduces only CUDA tensors, gloo only CPU ones: move there and back.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = tensor.detach().to(device, copy=True)
    dist.all_reduce(out, op=op)
    return out.to(tensor.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when flag is True on any rank (a collective: every rank calls it)."""
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), dist.ReduceOp.MAX).item())


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value` (a collective): e.g. a size all ranks must share."""
    return int(all_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MIN).item())


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (a new tensor; for logging, not for gradients)."""
    return all_reduce(tensor) / world_size()


def broadcast_object(obj, src: int = 0):
    """Rank src's `obj` (small, picklable) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_long_wait_groups: dict[datetime.timedelta, dist.ProcessGroup] = {}


def gather_objects(obj, timeout: datetime.timedelta | None = None) -> list:
    """Every rank's `obj` (small, picklable), in rank order; [obj] for a single process.

    With a timeout, the collective runs on a gloo group of its own with that timeout (created
    once, by all ranks together), for waits longer than the process group allows: e.g. ranks
    waiting while one builds the data cache.
    """
    if world_size() == 1:
        return [obj]
    group = None
    if timeout is not None:
        if timeout not in _long_wait_groups:
            _long_wait_groups[timeout] = dist.new_group(backend="gloo", timeout=timeout)
        group = _long_wait_groups[timeout]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def on_main(fn, timeout: datetime.timedelta | None = None):
    """fn() run by rank 0 alone, its result on every rank; an error it raises is raised on every
    rank (not left to hang the others in their next collective). timeout: how long the others
    may wait (gather_objects)."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 (passed on to every rank, raised again below)
            error = err
    if world_size() > 1:
        result, error = gather_objects((result, error), timeout)[0]
    if error is not None:
        raise error
    return result
