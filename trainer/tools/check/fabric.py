"""The fabric at the step's real sizes: the loss's all-gather of every rank's embeddings and the
gradient all-reduce, timed on every rank, with the slowest rank named."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from trainer.core import distributed
from trainer.core.memory import synchronize
from trainer.run.build import Run


def _timed(operation, device: torch.device, repeats: int) -> float:
    """Median seconds of one operation, every rank starting together (a barrier before each)."""
    times = []
    operation()  # the first call sets up the communicator
    for _ in range(repeats):
        distributed.barrier()
        synchronize(device)
        start = time.perf_counter()
        operation()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_sizes(run: Run) -> tuple[tuple[int, int], int]:
    """((rows, dim) of the embeddings one rank contributes to a step's gathers, gradient elements)."""
    local = run.inputs.batches.local_batch_size
    rows = local * (2 + run.inputs.num_negatives)  # queries, positives and negatives
    # ds_numel: a ZeRO-3 parameter's whole size (its numel is this rank's partition).
    elements = sum(getattr(p, "ds_numel", p.numel()) for p in run.encoder.parameters() if p.requires_grad)
    return (rows, run.encoder.dim), elements


def measure_fabric(run: Run, repeats: int) -> dict:
    """Per rank: seconds and GB/s of the gather and of the reduction (a collective)."""
    world, device = run.env.world_size, run.device
    (rows, dim), elements = step_sizes(run)
    figures = {"gather_bytes_per_rank": rows * dim * 4, "reduce_bytes": elements * 4}
    if world == 1:
        return {**figures, "ranks": None, "note": "one rank: no collective to time"}
    embeddings = torch.randn(rows, dim, device=device)
    gathered = torch.empty(world * rows, dim, device=device)
    gradient = torch.randn(elements, device=device)
    gather_s = _timed(lambda: dist.all_gather_into_tensor(gathered, embeddings), device, repeats)
    reduce_s = _timed(lambda: dist.all_reduce(gradient), device, repeats)
    mine = {"gather_s": gather_s, "reduce_s": reduce_s,
            # Bus bandwidth, as nccl-tests define it: what each rank's link carried.
            "gather_gbps": figures["gather_bytes_per_rank"] * (world - 1) / gather_s / 1e9,
            "reduce_gbps": figures["reduce_bytes"] * 2 * (world - 1) / world / reduce_s / 1e9}
    ranks = distributed.all_gather_object(mine)
    slowest = max(range(world), key=lambda r: ranks[r]["gather_s"] + ranks[r]["reduce_s"])
    return {**figures, "ranks": ranks, "slowest_rank": slowest}
