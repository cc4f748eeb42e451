"""The training run: data -> global batches -> GradCache step -> AdamW -> metrics, evaluation,
checkpoints -> the final sentence-transformers model.

Everything that can fail on bad input (data files, eval set, batch size) is checked before the
run writes anything. A run dir that already holds a complete checkpoint is resumed from it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import datasets
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from trainer import checkpoint, distributed
from trainer.backends import create_backend
from trainer.data import (
    Columns, GlobalBatches, StepBatches, TokenSettings, parse_sources, prepare, resolve_num_negatives, source_weights,
)
from trainer.deepspeed_config import build_config, resolve_backend
from trainer.early_stopping import EarlyStopping
from trainer.evaluate import evaluate, load_beir
from trainer.gradcache import GradCache, StepOutput
from trainer.losses import PRESETS, ContrastiveLoss
from trainer.metrics import RunLogger, alignment, embedding_std, uniformity
from trainer.model import AUTOCAST_DTYPES, Encoder, load_tokenizer, prompt_prefixes, resolve_device, text_embedder
from trainer.preemption import StopRequest

BEST_MODEL = "best-model"  # with early stopping: the best evaluation's model so far


def _say(*args) -> None:
    if distributed.is_main():
        print(*args, flush=True)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True) for k, v in batch.items()}


def train(cfg: DictConfig, run_dir: Path, wandb_group: str | None = None) -> dict | None:
    """Run (or resume) the training described by cfg in run_dir. Returns the final eval metrics."""
    env = distributed.init_distributed()
    if not env.is_main:  # one progress display per job: rank 0's
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    distributed.set_timeout(cfg.trainer.dist_timeout_min)
    device = resolve_device(cfg.trainer.device, env.local_rank)
    autocast_dtype = AUTOCAST_DTYPES[cfg.trainer.precision.value]
    run_dir = Path(run_dir)

    # 1. Inputs, all checked before anything is written.
    columns = Columns(cfg.data.query_column, cfg.data.positive_column, cfg.data.negatives_column, cfg.data.negative_prefix)
    train_spec = cfg.data.train
    sources = parse_sources(OmegaConf.to_container(train_spec) if OmegaConf.is_config(train_spec) else train_spec)
    eval_set = load_beir(cfg.eval.data) if cfg.eval.data else None
    early_stopping = _early_stopping(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                               pooling=cfg.model.pooling.value, append_eos=cfg.model.append_eos)
    query_prefix, doc_prefix = prompt_prefixes(cfg.model)
    settings = TokenSettings(cfg.model.query_max_length, cfg.model.doc_max_length, query_prefix, doc_prefix)
    data = prepare(sources, columns, tokenizer, settings, cfg.data.cache_dir)
    num_negatives = resolve_num_negatives(data, sources, cfg.data.num_negatives, cfg.data.missing_negatives.value)
    same_source = cfg.data.same_source_batches if cfg.data.same_source_batches is not None else len(sources) > 1
    weights = source_weights(data.sizes, [s.weight for s in sources], cfg.data.sampling.value, cfg.data.sampling_alpha)
    batches = GlobalBatches(
        data.sizes, cfg.data.batch_size, cfg.trainer.seed, env.world_size, env.rank,
        weights=weights, same_source=same_source, names=data.names,
    )
    total_steps = cfg.trainer.max_steps or cfg.trainer.epochs * batches.steps_per_epoch
    backend_name, backend_kwargs = _backend_settings(cfg, env.world_size)
    _say(
        f"{len(data)} training pairs in {_describe_sources(data, weights, same_source)} with {num_negatives} hard "
        f"negatives; global batch {cfg.data.batch_size} "
        f"over {env.world_size} rank(s); {total_steps} steps; backend {_describe(backend_name, backend_kwargs)}; "
        f"run dir {run_dir}"
    )

    # 2. Model, optimizer, schedule (the backend's), loss, step.
    torch.manual_seed(cfg.trainer.seed)
    hf_kwargs = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    encoder = Encoder.from_pretrained(
        cfg.model.name_or_path, pooling=cfg.model.pooling.value, dropout=cfg.model.dropout,
        trust_remote_code=cfg.model.trust_remote_code, **hf_kwargs,
    )
    if cfg.model.lora.r:
        lora = cfg.model.lora
        targets = list(lora.target_modules) if lora.target_modules else None
        encoder.add_lora(lora.r, lora.alpha, lora.dropout, targets)
    if cfg.model.gradient_checkpointing:
        encoder.enable_gradient_checkpointing()
    encoder.to(device).train()
    if cfg.trainer.compile:
        # In place (nn.Module.compile): parameter names, checkpoints and the export stay as they are.
        encoder.backbone.compile(dynamic=True)
    backend = create_backend(backend_name, encoder, device, cfg, total_steps, **backend_kwargs)
    loss_fn = ContrastiveLoss(
        temperature=cfg.loss.temperature,
        directions=[d.value for d in cfg.loss.directions],
        partition=cfg.loss.partition.value,
        mask_duplicates=cfg.loss.mask_duplicates,
        false_negative_margin=cfg.loss.false_negative_margin,
        tile_size=cfg.loss.tile_size,
        matryoshka_dims=list(cfg.loss.matryoshka_dims) if cfg.loss.matryoshka_dims else None,
        matryoshka_weights=list(cfg.loss.matryoshka_weights) if cfg.loss.matryoshka_weights else None,
    )
    step_fn = GradCache(
        backend.model, loss_fn, cfg.grad_cache.chunk_size, chunk_tokens=cfg.grad_cache.chunk_tokens,
        sort_by_length=cfg.grad_cache.sort_by_length, autocast_dtype=autocast_dtype, grad_scaler=backend.grad_scaler,
    )

    # 3. Resume, or start fresh with a per-rank dropout seed.
    latest = checkpoint.latest(run_dir, say=_say)
    if latest is not None:
        state = checkpoint.load(latest, backend.load_state)
        _say(f"resuming from {latest} (step {state.step})")
        if early_stopping is not None and state.early_stopping is not None:
            early_stopping.load_state_dict(state.early_stopping)
    else:
        state = checkpoint.TrainerState(step=0)
        torch.manual_seed(cfg.trainer.seed + env.rank)
    if (state.step >= total_steps or state.stopped_early) and (run_dir / "model").exists():
        how = " (stopped early)" if state.stopped_early else ""
        _say(f"{run_dir} is already complete ({state.step} steps{how}); nothing to do")
        return None
    logger = RunLogger(
        run_dir,
        enabled=env.is_main,
        resume_step=state.step if latest is not None else -1,
        wandb_mode=cfg.wandb.mode.value,
        wandb_project=cfg.wandb.project,
        wandb_group=cfg.wandb.group or wandb_group,
        wandb_entity=cfg.wandb.entity,
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    )

    def run_eval(step: int) -> dict | None:
        """Every rank embeds and searches its share of the eval set (a collective); with early
        stopping, a new best is exported to best-model/ at once."""
        if eval_set is None:
            return None
        encoder.eval()
        result = evaluate(
            text_embedder(encoder, tokenizer, query_prefix, cfg.model.query_max_length, device, autocast_dtype),
            text_embedder(encoder, tokenizer, doc_prefix, cfg.model.doc_max_length, device, autocast_dtype),
            eval_set,
            cfg.eval.batch_size,
            lockstep=backend.partitions_parameters,
            dims=cfg.loss.matryoshka_dims or (),
        )
        encoder.train()
        if env.is_main:
            logger.log_eval({"step": step, **result})
            tqdm.write(f"eval @ step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if early_stopping is not None and early_stopping.update(step, result):
            _export(backend, tokenizer, cfg, run_dir / BEST_MODEL, env.is_main)
            if env.is_main:
                best = {"step": step, "metric": early_stopping.metric, "value": result[early_stopping.metric]}
                (run_dir / "best.json").write_text(json.dumps(best) + "\n")
                logger.summary({"best_step": step, f"best/{early_stopping.metric}": best["value"]})
        distributed.barrier()
        return result

    def save_checkpoint(step: int, stopped_early: bool = False) -> None:
        state.step, state.wandb_id, state.stopped_early = step, logger.wandb_id, stopped_early
        state.early_stopping = early_stopping.state_dict() if early_stopping is not None else None
        checkpoint.save(run_dir, state, backend.save_state, keep=cfg.checkpoint.keep)

    # 4. The loop.
    if state.step == 0:
        run_eval(0)
    plateau = state.stopped_early  # a run that stopped early and crashed before its export: finish it
    end_step = state.step if plateau else total_steps
    loader = torch.utils.data.DataLoader(
        StepBatches(data, batches, tokenizer, num_negatives, state.step, end_step),
        batch_size=None,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    # From here on SIGTERM / SIGUSR1 mean "checkpoint at the next agreed step and exit".
    stop_request = StopRequest()
    progress = tqdm(total=total_steps, initial=state.step, disable=not env.is_main, desc="train", dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), state.step
    for step, batch in enumerate(loader, start=state.step + 1):
        batch = _to(batch, device)
        lr = backend.lr()
        out = step_fn(batch["queries"], batch["docs"], batch["query_hashes"], batch["doc_hashes"])
        loss_is_finite = _agree_finite(out.loss)
        result = backend.step(loss_is_finite)
        progress.update(1)
        skipped = not result.applied and not result.overflow
        if skipped:
            state.skipped_steps += 1
            state.bad_steps_in_a_row += 1
            if env.is_main:
                what = "gradient norm" if loss_is_finite else "loss"
                tqdm.write(f"step {step}: non-finite {what}; the update was skipped on every rank "
                           f"({state.bad_steps_in_a_row} in a row, {state.skipped_steps} in all)")
        elif result.applied:
            state.bad_steps_in_a_row = 0

        if step % cfg.trainer.log_every == 0 or step == total_steps or skipped:
            elapsed = time.perf_counter() - last_time
            record = _metrics(cfg, out, loss_fn, step, batches, lr, result.grad_norm, (step - last_step) * cfg.data.batch_size / elapsed)
            record["skipped_steps"] = state.skipped_steps
            if len(sources) > 1:
                record.update(_source_metrics(batches, step, record["loss"]))
            logger.log(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", pairs_s=f"{record['pairs_per_s']:.0f}")
            last_time, last_step = time.perf_counter(), step
        if cfg.trainer.max_bad_steps and state.bad_steps_in_a_row >= cfg.trainer.max_bad_steps:
            progress.close()
            logger.finish()
            distributed.barrier()  # every rank stops here; none exits while rank 0 still writes its logs
            kept = checkpoint.newest(run_dir)
            raise TrainingDiverged(
                f"{state.bad_steps_in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient "
                f"norm, so the run stopped (trainer.max_bad_steps={cfg.trainer.max_bad_steps}); "
                + (f"its last checkpoint, {kept}, is as it was" if kept else "no checkpoint was written")
                + ". Lower trainer.lr, raise loss.temperature or check the data, then run again"
            )
        if cfg.eval.every and step % cfg.eval.every == 0 and step != total_steps:
            run_eval(step)
            plateau = early_stopping is not None and early_stopping.should_stop
        signalled = stop_request.agreed()  # every rank sees the same answer at the same step
        stopping = step != total_steps and not plateau and (signalled or cfg.trainer.stop_after_step == step)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping or plateau or step == total_steps:
            save_checkpoint(step, stopped_early=plateau)
        if stopping:
            progress.close()
            reason = "on a stop signal" if signalled else "as asked (trainer.stop_after_step)"
            _say(f"stopped after step {step} {reason}, checkpoint written; run the same command to resume")
            logger.finish()
            stop_request.hand_over()  # e.g. submitit requeues the job here
            return None
        if plateau:
            break
    progress.close()
    stop_request.restore()

    # 5. The model (whole, whatever the sharding), the last evaluation, the summary.
    final = run_dir / "model"
    if early_stopping is None:
        _export(backend, tokenizer, cfg, final, env.is_main)
        result = run_eval(total_steps)
    else:
        # The best evaluation's model, which the last evaluation may yet replace.
        result = None if plateau else run_eval(total_steps)
        if env.is_main:
            shutil.rmtree(final, ignore_errors=True)
            (run_dir / BEST_MODEL).rename(final)
            logger.summary({"stopped_early": plateau, "stopped_at_step": state.step})
        _say(
            (f"stopped early after step {state.step}: " if plateau else f"finished {total_steps} steps; ")
            + f"{early_stopping.reason() if plateau else f'best {early_stopping.metric} {early_stopping.best:.4f} at step {early_stopping.best_step}'}"
            + f"; {final} holds the model of step {early_stopping.best_step}"
        )
    distributed.barrier()
    if env.is_main and eval_set is not None:
        evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
        first = next((e for e in evals if e["step"] == 0), None)
        before = f"{first['ndcg@10']:.4f}" if first else "n/a"
        kept_step = early_stopping.best_step if early_stopping is not None else total_steps
        kept = next(e for e in reversed(evals) if e["step"] == kept_step)
        print(f"NDCG@10 before {before} -> after {kept['ndcg@10']:.4f}; model saved to {final}", flush=True)
        result = result or kept
    logger.finish()
    return result


class TrainingDiverged(RuntimeError):
    """trainer.max_bad_steps non-finite steps in a row."""


def _agree_finite(loss: torch.Tensor) -> bool:
    """True when this step's loss is finite on every rank (a collective)."""
    return not distributed.any_rank(not bool(torch.isfinite(loss)))


def _export(backend, tokenizer, cfg, folder: Path, is_main: bool) -> None:
    """The whole model into folder, written beside it and renamed: a crash leaves the old one."""
    tmp = folder.with_name(folder.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    backend.export(tmp, tokenizer, max_seq_length=cfg.model.doc_max_length)
    if is_main:
        st_config = tmp / "config_sentence_transformers.json"
        config = json.loads(st_config.read_text())
        query_prefix, doc_prefix = prompt_prefixes(cfg.model)
        if query_prefix or doc_prefix:
            # model.encode(texts, prompt_name="query") prepends what training prepended.
            config["prompts"] = {"query": query_prefix, "document": doc_prefix}
        if cfg.loss.matryoshka_dims:
            # The sizes it was trained for, beside sentence-transformers' own keys (it ignores
            # this one): SentenceTransformer(path, truncate_dim=d) serves each of them.
            config["matryoshka_dims"] = sorted(cfg.loss.matryoshka_dims, reverse=True)
        st_config.write_text(json.dumps(config, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    distributed.barrier()


def _early_stopping(cfg) -> EarlyStopping | None:
    settings = cfg.trainer.early_stopping
    if settings.patience is None:
        return None
    if not cfg.eval.data or not cfg.eval.every:
        raise ValueError("trainer.early_stopping needs an evaluation curve: set eval.data and eval.every (steps between evaluations)")
    return EarlyStopping(metric=settings.metric, patience=settings.patience, min_delta=settings.min_delta)


def _backend_settings(cfg, world_size: int) -> tuple[str, dict]:
    """The backend's name and, for DeepSpeed, its engine config (checked before anything runs)."""
    precision = cfg.trainer.precision.value
    name = resolve_backend(cfg.trainer.backend.value if cfg.trainer.backend else None, precision)
    if name == "ddp":
        return name, {}
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("trainer.backend=deepspeed needs DeepSpeed: pip install 'contrastive-trainer[deepspeed]'")
    ds = cfg.deepspeed
    config = build_config(
        zero_stage=ds.zero_stage,
        offload_optimizer=ds.offload_optimizer,
        config_file=ds.config,
        micro_batch_size=cfg.data.batch_size // world_size,
        world_size=world_size,
        max_grad_norm=cfg.trainer.max_grad_norm,
        precision=precision,
    )
    return name, {"config": config}


def _describe(name: str, kwargs: dict) -> str:
    if name == "ddp":
        return "ddp"
    zero = kwargs["config"]["zero_optimization"]
    offload = zero.get("offload_optimizer", {}).get("device", "none")
    return f"deepspeed ZeRO-{zero['stage']}" + (f" (optimizer offloaded to {offload})" if offload != "none" else "")


def _describe_sources(data, weights, same_source: bool) -> str:
    if len(data.names) == 1:
        return "1 source"
    shares = ", ".join(f"{name} {size} rows p={w:.3f}" for name, size, w in zip(data.names, data.sizes, weights))
    return f"{len(data.names)} sources ({shares}; {'same-source' if same_source else 'mixed'} batches)"


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
