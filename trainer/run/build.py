"""A training run's parts, built once before step 1: inputs, model, sizes, backend, loss, step.

`build_run` checks everything that can fail on bad input (data files, eval set, batch size,
sizes) before the run writes anything. The `Run` it returns is what the loop (loop.py) works
with; its methods are the run's recurring chores: evaluate, export, checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from trainer.core import autochunk, distributed
from trainer.core.distributed import say
from trainer.core.embedders import text_embedder
from trainer.core.flops import ModelFlops, device_peak_tflops
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss
from trainer.core.model import AUTOCAST_DTYPES, Encoder, resolve_device
from trainer.core.tokenizer import base_max_length, load_tokenizer, prompt_prefixes
from trainer.data import (
    Columns,
    DataError,
    GlobalBatches,
    TokenSettings,
    TrainingData,
    parse_sources,
    prepare,
    require_scores,
    resolve_num_negatives,
    source_weights,
)
from trainer.eval.beir import BeirSet, load_beir
from trainer.eval.evaluate import evaluate
from trainer.run import checkpoint
from trainer.run.backends import TrainingBackend, create_backend
from trainer.run.card_facts import card_facts
from trainer.run.config import resolve_eval_data
from trainer.run.curves import BackgroundPlot
from trainer.run.deepspeed_config import build_config, resolve_backend
from trainer.run.early_stopping import EarlyStopping
from trainer.run.files import BEST_FILE
from trainer.run.logger import RunLogger
from trainer.run.model_card import write_model_card

BEST_MODEL = "best-model"  # with early stopping: the best evaluation's model so far


@dataclass
class Inputs:
    """What the data side of the config resolves to."""

    sources: list
    data: TrainingData
    batches: GlobalBatches
    num_negatives: int
    total_steps: int
    eval_set: BeirSet | None
    same_source: bool
    weights: object


@dataclass
class Run:
    cfg: DictConfig
    env: distributed.DistEnv
    run_dir: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    tokenizer: transformers.PreTrainedTokenizerBase
    query_prefix: str
    doc_prefix: str
    inputs: Inputs
    encoder: Encoder
    backend: TrainingBackend
    loss_fn: ContrastiveLoss
    step: object
    """The step: a GradCache, or an autochunk.AdaptiveStep around one (chunk sizes 'auto')."""
    eval_batch_size: int
    early_stopping: EarlyStopping | None
    export_max_length: int
    backend_description: str
    model_flops: ModelFlops | None = None
    probed_chunk_rows: int | None = None
    """With auto chunk sizes: the rows of max-length texts this rank's probe found room for (the
    run takes the smallest over ranks)."""
    peak_tflops: float | None = None
    logger: RunLogger | None = None
    curves: BackgroundPlot | None = None
    state: checkpoint.TrainerState = field(default_factory=lambda: checkpoint.TrainerState(step=0))

    @property
    def total_steps(self) -> int:
        return self.inputs.total_steps

    def evaluate(self, step: int) -> dict | None:
        """Every rank embeds and searches its share of the eval set (a collective); with early
        stopping, a new best is exported to best-model/ at once."""
        if self.inputs.eval_set is None:
            return None
        cfg, lockstep = self.cfg, self.backend.partitions_parameters
        self.encoder.eval()
        embedders = [
            text_embedder(self.encoder, self.tokenizer, prefix, length, self.device, self.autocast_dtype)
            for prefix, length in ((self.query_prefix, cfg.model.query_max_length), (self.doc_prefix, cfg.model.doc_max_length))
        ]
        if not lockstep:  # a forward that is a collective (ZeRO-3) cannot be split on one rank alone
            embedders = [autochunk.split_on_oom(embed, self.device) for embed in embedders]
        result = evaluate(*embedders, self.inputs.eval_set, self.eval_batch_size, lockstep=lockstep,
                          dims=cfg.loss.matryoshka_dims or ())
        self.encoder.train()
        if self.env.is_main:
            self.logger.log_eval({"step": step, **result})
            tqdm.write(f"eval @ step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        stopping = self.early_stopping
        if stopping is not None and stopping.update(step, result):
            self.export(self.run_dir / BEST_MODEL, step)
            if self.env.is_main:
                best = {"step": step, "metric": stopping.metric, "value": result[stopping.metric]}
                (self.run_dir / BEST_FILE).write_text(json.dumps(best) + "\n")
                self.logger.summary({"best_step": step, f"best/{stopping.metric}": best["value"]})
        if self.curves is not None:
            self.curves.refresh()
        distributed.barrier()
        return result

    def save_checkpoint(self, step: int, stopped_early: bool = False) -> None:
        state = self.state
        state.step, state.wandb_id, state.stopped_early = step, self.logger.wandb_id, stopped_early
        state.early_stopping = self.early_stopping.state_dict() if self.early_stopping is not None else None
        checkpoint.save(self.run_dir, state, self.backend.save_state, keep=self.cfg.checkpoint.keep)

    def export(self, folder: Path, step: int) -> None:
        """The model of this step, whole, with its card, into folder: written beside it and
        renamed, so a crash leaves the old one."""
        cfg, is_main = self.cfg, self.env.is_main
        tmp = folder.with_name(folder.name + ".tmp")
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.backend.export(tmp, self.tokenizer, max_seq_length=self.export_max_length)
        if is_main:
            write_model_card(tmp, card_facts(self, step))
            st_config = tmp / "config_sentence_transformers.json"
            config = json.loads(st_config.read_text())
            if self.query_prefix or self.doc_prefix:
                # model.encode(texts, prompt_name="query") prepends what training prepended.
                config["prompts"] = {"query": self.query_prefix, "document": self.doc_prefix}
            if cfg.loss.matryoshka_dims:
                # The sizes it was trained for, beside sentence-transformers' own keys (it ignores
                # this one): SentenceTransformer(path, truncate_dim=d) serves each of them.
                config["matryoshka_dims"] = sorted(cfg.loss.matryoshka_dims, reverse=True)
            st_config.write_text(json.dumps(config, indent=2))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        distributed.barrier()

    def open_logger(self, resumed: bool, wandb_group: str | None) -> None:
        cfg = self.cfg
        self.curves = BackgroundPlot(self.run_dir, enabled=self.env.is_main and cfg.trainer.curves)
        self.logger = RunLogger(
            self.run_dir,
            enabled=self.env.is_main,
            resume_step=self.state.step if resumed else -1,
            wandb_mode=cfg.wandb.mode.value,
            wandb_project=cfg.wandb.project,
            wandb_group=cfg.wandb.group or wandb_group,
            wandb_entity=cfg.wandb.entity,
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        )


def build_run(cfg: DictConfig, run_dir: Path) -> Run:
    """Everything before step 1, checked before anything is written."""
    env = distributed.init_distributed()
    if not env.is_main:  # one progress display per job: rank 0's
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    distributed.set_timeout(cfg.trainer.dist_timeout_min)
    device = resolve_device(cfg.trainer.device, env.local_rank)
    autocast_dtype = AUTOCAST_DTYPES[cfg.trainer.precision.value]
    early_stopping = _early_stopping(cfg)
    chunk_size = autochunk.parse_size(cfg.grad_cache.chunk_size, "grad_cache.chunk_size")
    chunk_tokens = autochunk.parse_size(cfg.grad_cache.chunk_tokens, "grad_cache.chunk_tokens")
    eval_batch_size = autochunk.parse_size(cfg.eval.batch_size, "eval.batch_size")
    if eval_batch_size is None:
        raise ValueError("eval.batch_size must be a positive integer or 'auto', got 0")
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                               pooling=cfg.model.pooling.value, append_eos=cfg.model.append_eos)
    query_prefix, doc_prefix = prompt_prefixes(cfg.model)
    inputs = _inputs(cfg, env, tokenizer, TokenSettings(cfg.model.query_max_length, cfg.model.doc_max_length, query_prefix, doc_prefix))
    backend_name, backend_kwargs = _backend_settings(cfg, env.world_size)
    backend_description = _describe(backend_name, backend_kwargs)
    say(
        f"{len(inputs.data)} training pairs in {_describe_sources(inputs)} with {inputs.num_negatives} hard "
        f"negatives; global batch {cfg.data.batch_size} over {env.world_size} rank(s); {inputs.total_steps} steps; "
        f"backend {backend_description}; run dir {run_dir}"
    )

    torch.manual_seed(cfg.trainer.seed)
    encoder = build_encoder(cfg, device)
    # Sizes are probed on the bare encoder, before DDP's or DeepSpeed's hooks exist.
    local_rows = cfg.data.batch_size // env.world_size
    sizes = _AutoSizes(cfg, encoder, device, autocast_dtype, local_rows, inputs.num_negatives)
    if autochunk.AUTO in (chunk_size, chunk_tokens):
        chunk_size, chunk_tokens = sizes.chunks(chunk_size, chunk_tokens)
    if eval_batch_size == autochunk.AUTO:
        eval_batch_size = sizes.eval_batch() if inputs.eval_set is not None else 1
    backend = create_backend(backend_name, encoder, device, cfg, inputs.total_steps, **backend_kwargs)
    loss_fn = _loss(cfg)
    auto = sizes.used_for_chunks
    # A ZeRO-3 forward gathers weights from every rank: no rank may stop alone in the middle of one.
    recover = auto and not (backend.partitions_parameters and env.world_size > 1)
    step = GradCache(
        backend.model, loss_fn, chunk_size, chunk_tokens=chunk_tokens, sort_by_length=cfg.grad_cache.sort_by_length,
        autocast_dtype=autocast_dtype, grad_scaler=backend.grad_scaler, recover_oom=recover,
        keep_graphs=_keep_graphs(cfg.grad_cache.keep_graphs), keep_reserve_bytes=sizes.reserve,
    )
    if recover:
        step = autochunk.AdaptiveStep(step, device, say=lambda text: tqdm.write(text) if env.is_main else None)
    return Run(cfg, env, Path(run_dir), device, autocast_dtype, tokenizer, query_prefix, doc_prefix, inputs, encoder,
               backend, loss_fn, step, eval_batch_size, early_stopping,
               export_length(cfg.model, tokenizer), backend_description,
               model_flops=ModelFlops(encoder), probed_chunk_rows=sizes.probed_rows,
               peak_tflops=device_peak_tflops(device, cfg.trainer.peak_tflops))


def _keep_graphs(value) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"grad_cache.keep_graphs must be auto, true or false, got {value!r}")


def export_length(model_cfg, tokenizer) -> int:
    """The exported model's max_seq_length: model.export_max_length, else the longer of the base
    model's own and the lengths trained at (training on short texts does not unlearn long ones)."""
    if model_cfg.export_max_length:
        return model_cfg.export_max_length
    base = base_max_length(model_cfg.name_or_path, tokenizer) or 0
    return max(model_cfg.query_max_length, model_cfg.doc_max_length, base)


def _inputs(cfg, env, tokenizer, settings: TokenSettings) -> Inputs:
    columns = Columns(cfg.data.query_column, cfg.data.positive_column, cfg.data.negatives_column, cfg.data.negative_prefix,
                      cfg.data.scores_column)
    train_spec = cfg.data.train
    sources = parse_sources(OmegaConf.to_container(train_spec) if OmegaConf.is_config(train_spec) else train_spec)
    eval_data = resolve_eval_data(cfg)
    if eval_data is None and cfg.eval.data == "auto":
        say("eval.data=auto: no evaluation (the demo's dev set goes only with the demo's data.train); "
            "set eval.data=BEIR_DIR to evaluate")
    eval_set = load_beir(eval_data) if eval_data else None
    data = prepare(sources, columns, tokenizer, settings, cfg.data.cache_dir)
    num_negatives = resolve_num_negatives(data, sources, cfg.data.num_negatives, cfg.data.missing_negatives.value)
    if cfg.loss.distill:
        require_scores(data, sources, f"loss.distill={cfg.loss.distill.value}")
        if num_negatives == 0:
            raise DataError(f"loss.distill={cfg.loss.distill.value} needs hard negatives: a group of one document "
                            "(the positive) has nothing to rank")
    same_source = cfg.data.same_source_batches if cfg.data.same_source_batches is not None else len(sources) > 1
    weights = source_weights(data.sizes, [s.weight for s in sources], cfg.data.sampling.value, cfg.data.sampling_alpha)
    batches = GlobalBatches(
        data.sizes, cfg.data.batch_size, cfg.trainer.seed, env.world_size, env.rank,
        weights=weights, same_source=same_source, names=data.names,
    )
    total_steps = cfg.trainer.max_steps or cfg.trainer.epochs * batches.steps_per_epoch
    return Inputs(sources, data, batches, num_negatives, total_steps, eval_set, same_source, weights)


def build_encoder(cfg, device: torch.device) -> Encoder:
    """The run's encoder from model.* (pooling, dropout, packing, LoRA, gradient checkpointing), in
    train mode on device; the caller seeds torch first (LoRA's initial weights)."""
    hf_kwargs = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    packing = {"auto": "auto", "on": True, "off": False}[cfg.model.packing.value]
    encoder = Encoder.from_pretrained(
        cfg.model.name_or_path, pooling=cfg.model.pooling.value, dropout=cfg.model.dropout,
        trust_remote_code=cfg.model.trust_remote_code, packing=packing, **hf_kwargs,
    )
    if packing == "auto" and not encoder.supports_packing:
        say(f"model.packing=auto: {type(encoder.backbone).__name__} does not dispatch attention through transformers' "
            "AttentionInterface, so its chunks are padded (ordered by length)")
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
    return encoder


def _loss(cfg) -> ContrastiveLoss:
    return ContrastiveLoss(
        temperature=cfg.loss.temperature,
        directions=[d.value for d in cfg.loss.directions],
        partition=cfg.loss.partition.value,
        mask_duplicates=cfg.loss.mask_duplicates,
        false_negative_margin=cfg.loss.false_negative_margin,
        tile_size=cfg.loss.tile_size,
        matryoshka_dims=list(cfg.loss.matryoshka_dims) if cfg.loss.matryoshka_dims else None,
        matryoshka_weights=list(cfg.loss.matryoshka_weights) if cfg.loss.matryoshka_weights else None,
        distill=cfg.loss.distill.value if cfg.loss.distill else None,
        distill_weight=cfg.loss.distill_weight,
        contrastive_weight=cfg.loss.contrastive_weight,
        teacher_temperature=cfg.loss.teacher_temperature,
    )


class _AutoSizes:
    """The 'auto' sizes of a run, probed on its own model before the backend wraps it, and agreed
    over ranks (each takes the smallest answer)."""

    EVAL_CAP_ROWS = 4096

    def __init__(self, cfg, encoder: Encoder, device, autocast_dtype, local_rows: int, num_negatives: int) -> None:
        self.cfg, self.encoder, self.device, self.autocast_dtype = cfg, encoder, device, autocast_dtype
        self.max_length = autochunk.longest_input(encoder, max(cfg.model.query_max_length, cfg.model.doc_max_length))
        self.doc_rows = local_rows * (1 + num_negatives)  # the longest side: one chunk never needs more
        self.reserve = autochunk.training_reserve(encoder, local_rows + self.doc_rows)
        self.used_for_chunks = False
        self.probed_rows: int | None = None

    def chunks(self, chunk_size, chunk_tokens) -> tuple[int | None, int | None]:
        probe = autochunk.probe_chunk_tokens(self.encoder, self.device, self.max_length, self.doc_rows,
                                             self.autocast_dtype, reserve_bytes=self.reserve)
        self.probed_rows = probe.rows
        rows = distributed.min_over_ranks(probe.rows)
        self.used_for_chunks = True
        tokens = rows * self.max_length
        say(f"grad_cache: {rows} texts of {self.max_length} tokens ({tokens} tokens) fit a chunk's forward and "
            f"backward in the {probe.available_bytes / 2**30:.2f} GiB left after the optimizer's share"
            + (f" (peak {probe.peak_bytes / 2**30:.2f} GiB)" if probe.peak_bytes else ""))
        if chunk_tokens == autochunk.AUTO:
            return (rows if chunk_size == autochunk.AUTO else chunk_size), tokens
        return rows, chunk_tokens  # chunk_size=auto alone: rows of any length, sized for the longest

    def eval_batch(self) -> int:
        rows = autochunk.probe_embedding_batch(self.encoder, self.device, self.max_length, self.autocast_dtype,
                                               self.EVAL_CAP_ROWS, reserve_bytes=self.reserve)
        say(f"eval.batch_size: {rows} texts of {self.max_length} tokens per forward")
        return rows


def _early_stopping(cfg) -> EarlyStopping | None:
    settings = cfg.trainer.early_stopping
    if settings.patience is None:
        return None
    if not resolve_eval_data(cfg) or not cfg.eval.every:
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


def _describe_sources(inputs: Inputs) -> str:
    data = inputs.data
    if len(data.names) == 1:
        return "1 source"
    shares = ", ".join(f"{name} {size} rows p={w:.3f}" for name, size, w in zip(data.names, data.sizes, inputs.weights))
    return f"{len(data.names)} sources ({shares}; {'same-source' if inputs.same_source else 'mixed'} batches)"
