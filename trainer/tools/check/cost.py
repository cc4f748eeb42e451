"""What the configured run will cost: its chunk budget and peak memory, one timed step at the
configured batch size (pairs/s, tokens/s, MFU), the input path's speed against the step's, and
the whole run's projected wall time with its evaluations."""

from __future__ import annotations

import math
import time

import torch

from trainer.core import distributed
from trainer.core.embedders import text_embedder
from trainer.core.memory import PeakMemory, available_bytes, synchronize
from trainer.data import StepBatches
from trainer.data.loader import to_device
from trainer.run.build import Run
from trainer.tools.check.exactness import base_step


def timed_step(run: Run, batch: dict) -> tuple[float, object]:
    """Seconds of one whole step (GradCache, then the backend's optimizer step), agreed as the
    slowest rank's, and the step's output."""
    synchronize(run.device)
    distributed.barrier()
    start = time.perf_counter()
    teacher = batch.get("teacher_scores") if run.loss_fn.distill else None
    out = run.step(batch["queries"], batch["docs"], batch["query_hashes"], batch["doc_hashes"], teacher)
    run.backend.step(True)
    synchronize(run.device)
    seconds = time.perf_counter() - start
    return max(distributed.all_gather_object(seconds)), out


def input_seconds(run: Run, batches: int) -> float:
    """Seconds this process takes to make one step's batch (the collate, in the loop's process)."""
    inputs = run.inputs
    made = StepBatches(inputs.data, inputs.batches, run.tokenizer, inputs.num_negatives, 1, 1 + batches)
    start = time.perf_counter()
    for index in range(len(made)):
        made[index]
    return (time.perf_counter() - start) / max(len(made), 1)


def evaluation_seconds(run: Run) -> float | None:
    """One evaluation's estimated seconds: a batch of queries and one of documents embedded and
    timed, scaled to this rank's share of each (the search itself, small beside, is left out)."""
    data = run.inputs.eval_set
    if data is None:
        return None
    cfg, total = run.cfg.model, 0.0
    run.encoder.eval()
    for texts, prefix, length in ((data.query_texts, run.query_prefix, cfg.query_max_length),
                                  (data.corpus_texts, run.doc_prefix, cfg.doc_max_length)):
        size = min(run.eval_batch_size, len(texts))
        embed = text_embedder(run.encoder, run.tokenizer, prefix, length, run.device, run.autocast_dtype)
        with torch.no_grad():
            embed(texts[:size])  # warm
            synchronize(run.device)
            start = time.perf_counter()
            embed(texts[:size])
            synchronize(run.device)
        total += (time.perf_counter() - start) * math.ceil(len(texts) / run.env.world_size / size)
    run.encoder.train()
    return total


def evaluations(run: Run) -> int:
    """How many evaluations the run makes: before step 1, every eval.every steps, and at the end."""
    if run.inputs.eval_set is None:
        return 0
    every = run.cfg.eval.every
    return 2 + ((run.total_steps - 1) // every if every else 0)


def measure_cost(run: Run, input_batches: int) -> dict:
    """Every figure of the module docstring (a collective)."""
    inputs, device = run.inputs, run.device
    batch = to_device(StepBatches(inputs.data, inputs.batches, run.tokenizer, inputs.num_negatives, 0, 1)[0],
                      device, non_blocking=False)
    step = base_step(run)
    timed_step(run, batch)  # warm: kernels, the allocator, DDP's buckets
    with PeakMemory(device) as peak:
        seconds, out = timed_step(run, batch)
    work = out.work
    tokens = sum(distributed.all_gather_object(work.real_tokens if work is not None else 0))
    flops = run.model_flops.of(work) if (run.model_flops is not None and work is not None) else None
    mfu = flops / seconds / (run.peak_tflops * 1e12) if flops and run.peak_tflops else None
    eval_s = evaluation_seconds(run)
    n_evals = evaluations(run)
    mine = {"available_bytes": available_bytes(device), "peak_bytes": peak.bytes, "mfu": mfu,
            "probed_chunk_rows": run.probed_chunk_rows}
    return {
        "chunk_size": step.chunk_size, "chunk_tokens": step.chunk_tokens,
        "ranks": distributed.all_gather_object(mine),
        "batch_size": run.cfg.data.batch_size, "step_s": seconds, "pairs_per_s": run.cfg.data.batch_size / seconds,
        "tokens_per_s": tokens / seconds, "input_s_per_batch": input_seconds(run, input_batches),
        "num_workers": run.cfg.data.num_workers, "total_steps": run.total_steps, "evaluations": n_evals,
        "evaluation_s": eval_s, "projected_s": run.total_steps * seconds + (eval_s or 0.0) * n_evals,
    }
