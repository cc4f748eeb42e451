"""Texts in, vectors out: the one way a tool, the miner, a teacher or the evaluation loads a model
to embed with (no gradients kept)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.core.autochunk import embedding_batch_size, split_on_oom
from trainer.core.model import AUTOCAST_DTYPES, Encoder
from trainer.core.tokenizer import load_tokenizer


def text_embedder(encoder: Encoder, tokenizer, prefix: str, max_length: int, device: torch.device, autocast_dtype=None):
    """texts -> (b, h) fp32 vectors (not normalised): tokenise with the prefix, truncate, embed
    under the given autocast dtype (None = fp32). For evaluation and mining (no grad is kept by
    the callers)."""

    def embed(texts: list[str]) -> Tensor:
        inputs = tokenizer([prefix + t for t in texts], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return encoder(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device))

    return embed



@dataclass
class TextEmbedders:
    """A model ready to embed on one device: its query and document embedders (texts -> fp32
    vectors, not normalised) and the batch size they take."""

    encoder: Encoder
    tokenizer: object
    embed_queries: Callable[[list[str]], Tensor]
    embed_docs: Callable[[list[str]], Tensor]
    batch_size: int | None


def load_embedders(name_or_path: str, device: torch.device, precision: str = "fp32", pooling: str | None = None,
                   trust_remote_code: bool = False, prefixes: tuple[str, str] = ("", ""),
                   max_lengths: tuple[int, int] = (512, 512), batch_size=None, append_eos: bool | None = None,
                   split_batches: bool = True, say: Callable[[str], None] = print) -> TextEmbedders:
    """The model at name_or_path (a folder, an installed package or a hub name) in eval mode on
    device, with pooling None = the saved model's own (else mean), and the tokenizer set up for
    that pooling. prefixes and max_lengths are (query, document). batch_size: an int, 'auto'
    (the largest batch of max-length texts whose forward fits, probed) or None (not needed).
    split_batches: a batch that runs out of memory is embedded in two halves (only for forwards
    that are not collectives)."""
    encoder = Encoder.from_pretrained(name_or_path, pooling=pooling, trust_remote_code=trust_remote_code).to(device).eval()
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code, pooling=encoder.pooling,
                               append_eos=append_eos)
    dtype = AUTOCAST_DTYPES[precision]
    embedders = [text_embedder(encoder, tokenizer, prefix, length, device, dtype) for prefix, length in zip(prefixes, max_lengths)]
    if split_batches:
        embedders = [split_on_oom(embed, device) for embed in embedders]
    if batch_size is not None:
        batch_size = embedding_batch_size(batch_size, "batch_size", encoder, device, max(max_lengths), dtype, say=say)
    return TextEmbedders(encoder, tokenizer, embedders[0], embedders[1], batch_size)
