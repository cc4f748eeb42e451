"""A torchrun worker that sets up what makes a restarted group read stale rendezvous keys
(tests/test_elastic.py). Attempt 0: both ranks join the process group, which publishes their
Gloo addresses, then rank 1 dies (kill -9). Attempt 1: rank 1 joins late, so rank 0 looks its
address up before rank 1 has renewed it (LATE_RANK=0 swaps the roles). JOIN=raw joins with plain tcp:// instead of
trainer.distributed, to show the failure the trainer avoids.
"""

from __future__ import annotations

import datetime
import os
import signal
import time

import torch
import torch.distributed as dist

from trainer.core import distributed

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
late = int(os.environ.get("LATE_RANK", "1"))
if attempt == 1 and rank == late:
    time.sleep(float(os.environ.get("LATE_S", "3")))
if os.environ.get("JOIN") == "raw":
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
else:
    distributed.init_distributed(timeout_s=30)
total = torch.ones(1)
dist.all_reduce(total)
if attempt == 0:
    if rank == late:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # until torchrun stops this rank to restart the group
print(f"attempt {attempt} rank {rank}: all_reduce gave {total.item():.0f}", flush=True)
dist.destroy_process_group()
