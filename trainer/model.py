"""The bi-encoder: one Hugging Face transformer shared by queries and documents, plus pooling.

The encoder maps a tokenised batch to one fp32 vector per text. It does not normalise: the loss
works on cosine similarity and normalises itself, and sentence-transformers' saved models decide
normalisation with a module of their own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel

POOLINGS = ("mean", "cls", "last_token")


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
    """A transformer backbone and a pooling: forward(input_ids, attention_mask, ...) -> (b, h) fp32."""

    def __init__(self, backbone: PreTrainedModel, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        # BERT-style models carry a pooler head that text embeddings never use. Left in place its
        # parameters get no gradient, which DDP (find_unused_parameters=False) treats as an error.
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None
        self.backbone = backbone
        self.pooling = pooling

    @classmethod
    def from_pretrained(cls, name_or_path: str, pooling: str = "mean", **hf_kwargs) -> Encoder:
        return cls(AutoModel.from_pretrained(name_or_path, **hf_kwargs), pooling=pooling)

    @property
    def dim(self) -> int:
        return self.backbone.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Tensor) -> Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return pool(out.last_hidden_state, attention_mask, self.pooling)
