"""The training run, in named phases: build (build.py: data, model, sizes, backend, step, all
checked before anything is written), resume (the newest verified checkpoint, if any), the loop
(batches made ahead -> GradCache step -> optimizer -> metrics, evaluations, checkpoints, stop
requests), and finish (the final sentence-transformers model, its evaluation, the summary).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from trainer.core import distributed
from trainer.core.autochunk import AdaptiveStep
from trainer.core.distributed import say
from trainer.core.gradcache import StepOutput
from trainer.core.health import alignment, embedding_std, uniformity
from trainer.core.losses import PRESETS, ContrastiveLoss
from trainer.data import GlobalBatches, StepBatches
from trainer.data.loader import Prefetcher
from trainer.run import checkpoint
from trainer.run.build import BEST_MODEL, Run, build_run
from trainer.run.files import EVAL_FILE, read_records
from trainer.run.preemption import StopRequest


def train(cfg: DictConfig, run_dir: Path, wandb_group: str | None = None) -> dict | None:
    """Run (or resume) the training described by cfg in run_dir. Returns the final eval metrics."""
    run = build_run(cfg, Path(run_dir))
    resumed = _resume(run)
    state = run.state
    if (state.step >= run.total_steps or state.stopped_early) and (run.run_dir / "model").exists():
        how = " (stopped early)" if state.stopped_early else ""
        say(f"{run.run_dir} is already complete ({state.step} steps{how}); nothing to do")
        return None
    run.open_logger(resumed, wandb_group)
    outcome = _loop(run)
    if outcome == _STOPPED:
        return None
    return _finish(run, plateau=outcome == _PLATEAU)


_DONE, _PLATEAU, _STOPPED = "done", "plateau", "stopped"


def _resume(run: Run) -> bool:
    """Load the newest verified checkpoint, if any; else seed each rank's dropout its own way."""
    latest = checkpoint.latest(run.run_dir, say=say)
    if latest is None:
        torch.manual_seed(run.cfg.trainer.seed + run.env.rank)
        return False
    run.state = checkpoint.load(latest, run.backend.load_state)
    say(f"resuming from {latest} (step {run.state.step})")
    if run.early_stopping is not None and run.state.early_stopping is not None:
        run.early_stopping.load_state_dict(run.state.early_stopping)
    return True


def _loop(run: Run) -> str:
    """Steps until the last one, a plateau, or an agreed stop (then a checkpoint, and _STOPPED)."""
    cfg, state = run.cfg, run.state
    if state.step == 0:
        run.evaluate(0)
    plateau = state.stopped_early  # a run that stopped early and crashed before its export: finish it
    end_step = state.step if plateau else run.total_steps
    inputs = run.inputs
    loader = Prefetcher(
        StepBatches(inputs.data, inputs.batches, run.tokenizer, inputs.num_negatives, state.step, end_step),
        run.device, depth=cfg.data.prefetch, num_workers=cfg.data.num_workers,
    )
    # From here on SIGTERM / SIGUSR1 mean "checkpoint at the next agreed step and exit".
    stop_request = StopRequest()
    progress = tqdm(total=run.total_steps, initial=state.step, disable=not run.env.is_main, desc="train", dynamic_ncols=True)
    interval = _Interval(state.step, loader)
    try:
        for step, batch in enumerate(loader, start=state.step + 1):
            lr, out, result, skipped = _train_step(run, batch, step)
            interval.add(out, run.model_flops)
            progress.update(1)
            if step % cfg.trainer.log_every == 0 or step == run.total_steps or skipped:
                _log_step(run, out, step, lr, result, interval, progress)
            _stop_if_diverged(run, step, progress)
            if cfg.eval.every and step % cfg.eval.every == 0 and step != run.total_steps:
                run.evaluate(step)
                plateau = run.early_stopping is not None and run.early_stopping.should_stop
            signalled = stop_request.agreed()  # every rank sees the same answer at the same step
            stopping = step != run.total_steps and not plateau and (signalled or cfg.trainer.stop_after_step == step)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping or plateau or step == run.total_steps:
                run.save_checkpoint(step, stopped_early=plateau)
            if stopping:
                progress.close()
                reason = "on a stop signal" if signalled else "as asked (trainer.stop_after_step)"
                say(f"stopped after step {step} {reason}, checkpoint written; run the same command to resume")
                run.curves.refresh()  # not waited for: the job may have seconds left
                run.logger.finish()
                stop_request.hand_over()  # e.g. submitit requeues the job here
                return _STOPPED
            if plateau:
                break
    finally:
        loader.close()
    progress.close()
    stop_request.restore()
    return _PLATEAU if plateau else _DONE


def _train_step(run: Run, batch: dict, step: int):
    """One optimizer step: (lr used, step output, backend result, whether it was skipped).

    The host waits for the device only where a decision needs a number (GradCache plans its
    chunks from the collate's host-side lengths, with no sync per chunk):
    - whether the loss is finite on every rank (_agree_finite: skip the update or not);
    - whether the clipped gradient norm is finite (the backend's step: apply it or not);
    - with auto chunk sizes, whether any rank ran out of memory, after pass 1 and before the
      reducing chunk (autochunk.AdaptiveStep: run the step again or not);
    - on logged steps only, the figures of the metrics line.
    """
    state = run.state
    lr = run.backend.lr()
    teacher = batch.get("teacher_scores") if run.loss_fn.distill else None
    out = run.step(batch["queries"], batch["docs"], batch["query_hashes"], batch["doc_hashes"], teacher)
    loss_is_finite = _agree_finite(out.loss)
    result = run.backend.step(loss_is_finite)
    skipped = not result.applied and not result.overflow
    if skipped:
        state.skipped_steps += 1
        state.bad_steps_in_a_row += 1
        if run.env.is_main:
            what = "gradient norm" if loss_is_finite else "loss"
            tqdm.write(f"step {step}: non-finite {what}; the update was skipped on every rank "
                       f"({state.bad_steps_in_a_row} in a row, {state.skipped_steps} in all)")
    elif result.applied:
        state.bad_steps_in_a_row = 0
    return lr, out, result, skipped


class _Interval:
    """Time, steps, input waits and the encoder's work (this rank's) since the last logged step."""

    def __init__(self, step: int, loader: Prefetcher) -> None:
        self.loader = loader
        self.reset(step)

    def reset(self, step: int) -> None:
        self.time, self.step, self.wait = time.perf_counter(), step, self.loader.wait_s
        self.real_tokens, self.computed_tokens, self.flops = 0, 0, 0.0

    def add(self, out: StepOutput, model_flops) -> None:
        if out.work is not None:
            self.real_tokens += out.work.real_tokens
            self.computed_tokens += out.work.computed_tokens
            self.flops += model_flops.of(out.work) if model_flops is not None else 0.0

    def figures(self, step: int, batch_size: int) -> tuple[float, float, float]:
        """(pairs/s, mean input wait per step in s, share of the time spent waiting)."""
        elapsed = self.elapsed()
        steps, waited = max(step - self.step, 1), self.loader.wait_s - self.wait
        return (step - self.step) * batch_size / elapsed, waited / steps, waited / elapsed

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.time, 1e-9)


def _log_step(run: Run, out, step: int, lr: float, result, interval: _Interval, progress) -> None:
    cfg = run.cfg
    pairs_per_s, wait_s, wait_share = interval.figures(step, cfg.data.batch_size)
    record = _metrics(cfg, out, run.loss_fn, step, run.inputs.batches, lr, result.grad_norm, pairs_per_s)
    record["skipped_steps"] = run.state.skipped_steps
    record["data_wait_s"] = wait_s
    record.update(_hardware_figures(run, interval))
    if isinstance(run.step, AdaptiveStep):
        record["chunk_tokens" if run.step.step.chunk_tokens else "chunk_size"] = run.step.budget
    if len(run.inputs.sources) > 1:
        record.update(_source_metrics(run.inputs.batches, step, record["loss"]))
    run.logger.log(record)
    postfix = {"loss": f"{record['loss']:.4f}", "pairs_s": f"{pairs_per_s:.0f}", "tok_s": f"{record['tokens_per_s']:.3g}"}
    if "mfu" in record:
        postfix["mfu"] = f"{record['mfu']:.1%}"
    if wait_share > 0.05:  # the input, not the model, sets the pace
        postfix["waiting_for_data"] = f"{wait_share:.0%}"
    progress.set_postfix(postfix)
    interval.reset(step)


def _hardware_figures(run: Run, interval: _Interval) -> dict:
    """tokens_per_s (real tokens, all ranks), padding (the share of computed tokens that are
    padding) and, where the device's peak is known, mfu (model FLOPs on real tokens per second
    over the peak, the mean over ranks). A collective: every rank calls it."""
    local = torch.tensor([interval.real_tokens, interval.computed_tokens, interval.flops], dtype=torch.float64)
    real, computed, flops = distributed.all_reduce_mean(local).tolist()
    elapsed = interval.elapsed()
    figures = {"tokens_per_s": real * run.env.world_size / elapsed, "padding": 1 - real / computed if computed else 0.0}
    if run.peak_tflops:
        figures["mfu"] = flops / elapsed / (run.peak_tflops * 1e12)
    return figures


def _stop_if_diverged(run: Run, step: int, progress) -> None:
    cfg, state = run.cfg, run.state
    if not cfg.trainer.max_bad_steps or state.bad_steps_in_a_row < cfg.trainer.max_bad_steps:
        return
    progress.close()
    run.logger.finish()
    distributed.barrier()  # every rank stops here; none exits while rank 0 still writes its logs
    kept = checkpoint.newest(run.run_dir)
    raise TrainingDiverged(
        f"{state.bad_steps_in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient "
        f"norm, so the run stopped (trainer.max_bad_steps={cfg.trainer.max_bad_steps}); "
        + (f"its last checkpoint, {kept}, is as it was" if kept else "no checkpoint was written")
        + ". Lower trainer.lr, raise loss.temperature or check the data, then run again"
    )


def _finish(run: Run, plateau: bool) -> dict | None:
    """The model (whole, whatever the sharding), the last evaluation, the summary."""
    final, stopping, state = run.run_dir / "model", run.early_stopping, run.state
    if stopping is None:
        result = run.evaluate(run.total_steps)  # first: the model's card states this evaluation
        run.export(final, run.total_steps)
    else:
        # The best evaluation's model, which the last evaluation may yet replace.
        result = None if plateau else run.evaluate(run.total_steps)
        if run.env.is_main:
            shutil.rmtree(final, ignore_errors=True)
            (run.run_dir / BEST_MODEL).rename(final)
            run.logger.summary({"stopped_early": plateau, "stopped_at_step": state.step})
        say(
            (f"stopped early after step {state.step}: " if plateau else f"finished {run.total_steps} steps; ")
            + (stopping.reason() if plateau else f"best {stopping.metric} {stopping.best:.4f} at step {stopping.best_step}")
            + f"; {final} holds the model of step {stopping.best_step}"
        )
    distributed.barrier()
    if run.env.is_main and run.inputs.eval_set is not None:
        evals = {e["step"]: e for e in read_records(run.run_dir / EVAL_FILE)}
        before = f"{evals[0]['ndcg@10']:.4f}" if 0 in evals else "n/a"
        kept = evals[stopping.best_step if stopping is not None else run.total_steps]
        print(f"NDCG@10 before {before} -> after {kept['ndcg@10']:.4f}; model saved to {final}", flush=True)
        result = result or kept
    run.curves.finish()
    run.logger.finish()
    return result


class TrainingDiverged(RuntimeError):
    """trainer.max_bad_steps non-finite steps in a row."""


def _agree_finite(loss: torch.Tensor) -> bool:
    """True when this step's loss is finite on every rank (a collective)."""
    return not distributed.any_rank(not bool(torch.isfinite(loss)))


def _source_metrics(batches: GlobalBatches, step: int, loss: float) -> dict:
    """Rows drawn from each source so far; with same-source batches, the step's source and its loss."""
    record = {f"rows_seen/{name}": rows for name, rows in batches.rows_seen(step).items()}
    k = batches.source_of(step - 1)
    if k is not None:
        record["source"] = batches.names[k]
        record[f"loss/{batches.names[k]}"] = loss
    return record


def _metrics(cfg, out: StepOutput, loss_fn, step, batches, lr, grad_norm, pairs_per_s) -> dict:
    """The step's figures, averaged over ranks (a collective: every rank calls it)."""
    stats = out.stats
    emb_std = embedding_std(torch.cat([out.query_embeddings, out.doc_embeddings[:, 0]]))
    local = torch.tensor([float(x) for x in (out.loss, stats.accuracy, stats.pos_sim, stats.neg_sim, emb_std)])
    loss, accuracy, pos_sim, neg_sim, emb_std = distributed.all_reduce_mean(local).tolist()
    record = {
        "step": step,
        "epoch": (step - 1) // batches.steps_per_epoch,
        "loss": loss,
        "lr": lr,
        "temperature": cfg.loss.temperature,
        "pairs_per_s": pairs_per_s,
        "accuracy": accuracy,
        "pos_sim": pos_sim,
        "neg_sim": neg_sim,
        "emb_std": emb_std,
        "grad_norm": float(grad_norm),
    }
    if loss_fn.distill:  # the parts of the total, and whether student and teacher order groups alike
        parts = loss_fn.last_parts
        local = torch.tensor([float(parts[k]) for k in ("contrastive", "distill", "rank_agreement")])
        record["loss_contrastive"], record["loss_distill"], record["rank_agreement"] = distributed.all_reduce_mean(local).tolist()
    if cfg.trainer.health_every and step % cfg.trainer.health_every == 0:
        # Every loss variant on the same embeddings: how the objectives move relative to each other.
        with torch.no_grad():
            for name in PRESETS:
                variant = ContrastiveLoss.from_preset(name, temperature=loss_fn.temperature)
                record[f"loss_{name}"] = distributed.all_reduce_mean(variant(out.query_embeddings, out.doc_embeddings)).item()
        health = torch.tensor(
            [
                alignment(out.query_embeddings, out.doc_embeddings[:, 0]),
                uniformity(torch.cat([out.query_embeddings, out.doc_embeddings[:, 0]])),
            ]
        )
        record["alignment"], record["uniformity"] = distributed.all_reduce_mean(health).tolist()
    return record
