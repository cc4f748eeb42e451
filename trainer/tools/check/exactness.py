"""Exactness on this hardware: one chunked step of a few rows per rank through the run's real path
(the gather over every rank, GradCache's chunks, the configured backend and its one reduction)
against a reference each rank computes alone, with no collective: the loss over the whole
gathered sub-batch, unchunked, in fp32. Dropout is off on both sides, except in the replay check.
Besides the gradient: where each rank's rows and hard negatives sit in the gathered matrix, the
gather's own gradient factor, the reductions per step (counted), and the replay's determinism."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from trainer.core.autochunk import AdaptiveStep
from trainer.core.chunk_plan import tensors_and_lengths
from trainer.core.gradcache import GradCache
from trainer.data import collate
from trainer.data.loader import to_device
from trainer.data.sampling import BatchRows
from trainer.run.build import Run, build_encoder
from trainer.tools.check.layout import gather_gradient_factor, layout_problems

# Both sides in fp32: what separates them is summation order alone (chunks against one pass,
# packed attention against padded, the ranks' reduction against one process). fp32's rounding
# (6e-8 a step, growing about as the square root of the terms summed: ~1e-6 over a layer's
# thousands) stays 100x below this; every bug the check looks for moves the gradient by a sizeable
# fraction of itself (the other ranks' share of every column gradient, a factor of the world size).
FP32_TOLERANCE = 1e-4
# bf16/fp16 autocast on the run's side: its rounding, measured on this model and batch (the same
# reference computed under the run's autocast), times this margin (chunking and the ranks'
# reduction reorder sums of rounded terms, which may double the error; 4 leaves room for that).
ROUNDING_MARGIN = 4.0


@dataclass
class Failure:
    rank: int | None  # None: every rank alike
    message: str


@dataclass
class Exactness:
    failures: list[Failure] = field(default_factory=list)
    figures: dict = field(default_factory=dict)


def first_batch_rows(run: Run, rows: int) -> tuple[dict, dict, int]:
    """(this rank's k rows of global batch 0, every rank's k rows in rank order, k): what the real
    step and the reference see. Each rank's k are the first of its own share."""
    batches, world = run.inputs.batches, run.env.world_size
    whole, local = batches.global_rows(0), batches.local_batch_size
    k = min(rows, local)
    take = np.concatenate([np.arange(r * local, r * local + k) for r in range(world)])
    mine = take[run.env.rank * k : (run.env.rank + 1) * k]

    def made(index: np.ndarray) -> dict:
        part = BatchRows(whole.source[index], whole.row[index], whole.epoch[index])
        return to_device(collate(run.inputs.data, part, run.tokenizer, run.inputs.num_negatives, batches.seed),
                         run.device, non_blocking=False)

    return made(mine), made(take), k


def base_step(run: Run) -> GradCache:
    return run.step.step if isinstance(run.step, AdaptiveStep) else run.step


def real_step(run: Run, batch: dict, chunk_rows: int | None, keep_graphs: bool):
    """One step through the run's own GradCache settings (packing, precision, ordering), chunks of
    chunk_rows texts (None: one pass, no chunks), on the backend's wrapped model."""
    base = base_step(run)
    step = GradCache(run.backend.model, run.loss_fn, chunk_rows, sort_by_length=base.sort_by_length,
                     autocast_dtype=base.autocast_dtype, trim_padding=base.trim_padding, pack=base.pack,
                     keep_graphs=keep_graphs, grad_scaler=run.backend.grad_scaler)
    teacher = batch.get("teacher_scores") if run.loss_fn.distill else None
    return step(batch["queries"], batch["docs"], batch["query_hashes"], batch["doc_hashes"], teacher)


def _engine(run: Run):
    """The DeepSpeed engine the run's GradCache drives (None under DDP or one plain process)."""
    return base_step(run).engine


def read_gradients(run: Run) -> dict[str, torch.Tensor]:
    """The step's reduced gradient of every trainable parameter, whole and unscaled, in fp32."""
    full_grad = (lambda p: p.grad) if _engine(run) is None else _deepspeed_full_grad()
    scale = run.backend.grad_scaler.get_scale() if run.backend.grad_scaler is not None else 1.0
    out = {}
    for name, p in run.encoder.named_parameters():
        if not p.requires_grad:
            continue
        grad = full_grad(p)
        if grad is not None:
            out[name] = grad.detach().float().clone() / scale
    return out


def _deepspeed_full_grad():
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad


def clear_gradients(run: Run) -> None:
    """Drop the step's gradients the backend's own way (a step at learning rate 0: the weights stay
    as they are, and ZeRO's partitioned gradient buffers are cleared as after any step)."""
    engine = _engine(run)
    optimizer = engine.optimizer if engine is not None else run.backend.optimizer
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    run.backend.step(True)


class ReductionCounter:
    """Gradient reductions issued so far: DDP's buckets (a communication hook that counts and then
    reduces as DDP's default does), or DeepSpeed's reduce collectives (its comm logger)."""

    def __init__(self, run: Run) -> None:
        self.model, self.calls, self.engine = run.backend.model, [0], _engine(run)
        if isinstance(self.model, DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
                allreduce_hook,
            )

            def counting(state, bucket):
                self.calls[0] += 1
                return allreduce_hook(None, bucket)

            self.model.register_comm_hook(None, counting)
        elif self.engine is not None:
            from deepspeed import comm

            comm.comms_logger.enabled, comm.comms_logger.prof_all = True, True

    def close(self) -> None:
        """Stop DeepSpeed's comm logger (it times every collective: the timed step must not pay)."""
        if self.engine is not None:
            from deepspeed import comm

            comm.comms_logger.enabled = False

    def count(self) -> int:
        if self.engine is not None:
            from deepspeed import comm

            return sum(n for op, sizes in comm.comms_logger.comms_dict.items() if "reduce" in op
                       for n, *_ in sizes.values())
        return self.calls[0]


def relative_difference(grads: dict, reference: dict) -> float:
    """|grads - reference| / |reference| over every parameter at once (a parameter the step left
    without a gradient counts as zero)."""
    diff = sum(float((grads.get(n, torch.zeros_like(g)).to(g.device) - g).double().pow(2).sum()) for n, g in reference.items())
    norm = sum(float(g.double().pow(2).sum()) for g in reference.values())
    return math.sqrt(diff) / max(math.sqrt(norm), 1e-30)


def scale_against(grads: dict, reference: dict) -> float:
    """The factor a that best fits grads ~ a x reference (least squares)."""
    dot = sum(float((grads[n].to(g.device).double() * g.double()).sum()) for n, g in reference.items() if n in grads)
    return dot / max(sum(float(g.double().pow(2).sum()) for g in reference.values()), 1e-30)


def reference_gradients(run: Run, everyone: dict, autocast: bool = False) -> tuple[dict, float]:
    """The reference, on this rank alone: a fresh copy of the run's model (the same seed, so the
    same weights), dropout off, padded, one pass over every rank's rows, the run's loss without
    the gather, in fp32 (or under the run's autocast, to measure its rounding)."""
    torch.manual_seed(run.cfg.trainer.seed)
    model = build_encoder(run.cfg, run.device).eval()
    loss_fn = copy.deepcopy(run.loss_fn)
    loss_fn.gather = False
    queries, _ = tensors_and_lengths(everyone["queries"])
    docs, _ = tensors_and_lengths(everyone["docs"])
    dtype = run.autocast_dtype if autocast else None
    with torch.autocast(run.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        q = model(input_ids=queries["input_ids"], attention_mask=queries["attention_mask"])
        d = model(input_ids=docs["input_ids"], attention_mask=docs["attention_mask"])
    d = d.view(q.shape[0], -1, q.shape[-1])
    teacher = everyone.get("teacher_scores") if loss_fn.distill else None
    loss = loss_fn(q.float(), d.float(), everyone["query_hashes"], everyone["doc_hashes"], teacher)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return grads, float(loss.detach())


def tolerance(run: Run, everyone: dict, reference: dict) -> tuple[float, str]:
    """(tolerance, why) for the run's precision (see FP32_TOLERANCE and ROUNDING_MARGIN)."""
    if run.autocast_dtype is None:
        return FP32_TOLERANCE, "fp32 on both sides: summation order alone"
    rounded, _ = reference_gradients(run, everyone, autocast=True)
    noise = relative_difference(rounded, reference)
    name = run.cfg.trainer.precision.value
    return max(FP32_TOLERANCE, ROUNDING_MARGIN * noise), (
        f"{name} autocast: its rounding on this model and batch is {noise:.2e} (the reference under {name} "
        f"against fp32), x {ROUNDING_MARGIN:g}")


def check_exactness(run: Run, rows: int, chunk_rows: int) -> Exactness:
    """Every exactness check of the module docstring (a collective: every rank runs it)."""
    result, rank, world = Exactness(), run.env.rank, run.env.world_size
    counter = ReductionCounter(run)
    mine, everyone, k = first_batch_rows(run, rows)
    run.backend.model.eval()  # dropout off on both sides
    counts = {}
    for _ in range(2):  # the second plain step counts: DDP rebuilds its buckets after the first
        before = counter.count()
        real_step(run, mine, None, keep_graphs=False)
        counts["plain"] = counter.count() - before
        clear_gradients(run)
    steps = {}
    for name, keep in (("re-embedded", False), ("kept", True)):
        before = counter.count()
        out = real_step(run, mine, chunk_rows, keep_graphs=keep)
        counts[name] = counter.count() - before
        steps[name] = read_gradients(run)
        result.figures[f"chunks_{name}"] = out.work.chunks if out.work is not None else None
        clear_gradients(run)
    reference, reference_loss = reference_gradients(run, everyone)
    tol, why = tolerance(run, everyone, reference)
    result.figures.update(rows_per_rank=k, chunk_rows=chunk_rows, tolerance=tol, tolerance_reason=why,
                          reference_loss=reference_loss, reductions=counts)
    for name, grads in steps.items():
        diff = relative_difference(grads, reference)
        result.figures[f"difference_{name}"] = diff
        if not diff <= tol:
            cause = _cause(scale_against(grads, reference), world)
            result.failures.append(Failure(rank, f"gradients ({name} chunks) differ from the reference by {diff:.2e} "
                                                 f"(tolerance {tol:.1e}){cause}"))
    for name in ("re-embedded", "kept"):
        if counts[name] != counts["plain"]:
            result.failures.append(Failure(rank, f"the chunked step ({name}) reduced gradients {counts[name]} times "
                                                 f"where one backward reduces {counts['plain']} (once per bucket)"))
    slots = 1 + run.inputs.num_negatives
    for problem in layout_problems(k, slots, run.loss_fn.gather, run.loss_fn.mask_duplicates, run.device):
        result.failures.append(Failure(rank, problem))
    if run.loss_fn.gather and world > 1:
        factor = gather_gradient_factor(k, 8, run.device)
        result.figures["gather_gradient_factor"] = factor
        if abs(factor - world) > 1e-3 * world:
            what = ("drops the gradient of the other ranks' use of this rank's rows" if abs(factor - 1) < 1e-3
                    else "has a stray factor" if abs(factor - world * world) < 1e-3 * world * world else "is off")
            result.failures.append(Failure(rank, f"the gather {what}: it hands back {factor:.3g}x the upstream "
                                                 f"gradient, the loss needs {world}x (the sum over ranks)"))
    result.failures += _replay(run, mine, chunk_rows, tol, result.figures, _has_dropout(run.encoder))
    counter.close()
    run.backend.model.train()
    return result


def _cause(scale: float, world: int) -> str:
    if world > 1 and abs(scale - world) < 0.05 * world:
        return f"; the gradient is {scale:.2f}x the reference: a stray factor of the world size ({world})"
    if world > 1 and abs(scale - 1 / world) < 0.05 / world:
        return f"; the gradient is {scale:.3f}x the reference: divided by the world size ({world}) once too often"
    return f"; best fit {scale:.3f}x the reference"


def _replay(run: Run, batch: dict, chunk_rows: int, tol: float, figures: dict, dropout: bool) -> list[Failure]:
    """Dropout on: the same chunked step twice from the same generator state gives the same
    gradient, and re-embedded chunks (replayed) give what kept graphs (never replayed) give."""
    run.backend.model.train()
    grads = {}
    for name, keep in (("first", False), ("again", False), ("kept", True)):
        torch.manual_seed(run.cfg.trainer.seed + 7919 * (1 + run.env.rank))
        if torch.cuda.is_available():
            torch.cuda.manual_seed(run.cfg.trainer.seed + 7919 * (1 + run.env.rank))
        real_step(run, batch, chunk_rows, keep_graphs=keep)
        grads[name] = read_gradients(run)
        clear_gradients(run)
    again, kept = relative_difference(grads["again"], grads["first"]), relative_difference(grads["kept"], grads["first"])
    figures.update(replay_dropout=dropout, replay_difference=again, replay_kept_difference=kept)
    # Run twice, the same kernels on the same inputs: only nondeterministic reductions (a GPU's
    # atomic adds in backward) may move the last bits.
    same = 0.0 if run.device.type == "cpu" else 1e-6
    failures = []
    if not again <= same:
        failures.append(Failure(run.env.rank, f"the same chunked step run twice with dropout on gave gradients "
                                              f"{again:.2e} apart (the replay is not deterministic)"))
    if not kept <= tol:
        failures.append(Failure(run.env.rank, f"with dropout on, re-embedded chunks differ from kept graphs by "
                                              f"{kept:.2e} (tolerance {tol:.1e}): the replay does not redraw the "
                                              f"first pass's dropout masks"))
    return failures


def _has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
