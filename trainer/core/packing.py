"""Padding-free chunks: a chunk's texts packed end to end into one row of real tokens.

A padded chunk of n texts costs n x (its longest text) tokens in every linear layer; a packed one
costs the sum of their lengths. Three things make the packed row compute what the padded chunk
computes for every text alone:
- positions restart at 0 for each text (position_ids), as with right padding;
- attention stays inside each text: an attention function registered in transformers'
  AttentionInterface (so every model whose layers dispatch through it packs: BERT/MiniLM, XLM-R,
  ModernBERT, decoders with causal attention) reads the chunk's layout and attends per text;
- pooling (mean, CLS, last token) is taken per text of the packed row.

Attention per text: on CUDA in bf16/fp16 with no attention dropout, torch's own flash varlen
kernel (torch.nn.attention.varlen); otherwise, and on CPU, the packed q/k/v are laid into an
(n, longest, ...) grid and scaled_dot_product_attention runs on it with a key-padding mask and the
model's dropout (the grid costs padding in attention alone, which is small next to the linear
layers for texts of a few hundred tokens). Every gather and scatter here hits each place once, so
their backward is deterministic and GradCache's replay gives the same numbers in both passes.

The layout is built on the host from the lengths the collate knows: no host sync per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "packed_"
"""Our attention implementation's name is this prefix + the one it replaces (packed_sdpa): padded
calls go on through the original, packed calls through ours."""


@dataclass(frozen=True)
class PackedLayout:
    """Where each text of a packed row lies. All tensors on the model's device."""

    cu_seq_lens: Tensor
    """(n + 1,) int32: text i is tokens cu_seq_lens[i] .. cu_seq_lens[i + 1] - 1 of the row."""
    max_length: int
    """The longest text (host int)."""
    token_slot: Tensor
    """(T,) int64: each packed token's place in the flattened (n, max_length) grid."""
    slot_token: Tensor
    """(n * max_length,) int64: each grid place's packed token; T (a zero row) for padding."""
    lengths: Tensor
    """(n,) int64 text lengths."""

    @property
    def num_texts(self) -> int:
        return self.lengths.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.token_slot.shape[0]

    def grid(self, packed: Tensor) -> Tensor:
        """(T, ...) packed rows -> (n, max_length, ...), zeros where a text is shorter."""
        padded = torch.cat([packed, packed.new_zeros((1, *packed.shape[1:]))])
        return padded.index_select(0, self.slot_token).view(self.num_texts, self.max_length, *packed.shape[1:])

    def ungrid(self, grid: Tensor) -> Tensor:
        """(n, max_length, ...) -> (T, ...): the grid's real places, in packed order."""
        return grid.reshape(-1, *grid.shape[2:]).index_select(0, self.token_slot)

    def valid(self) -> Tensor:
        """(n, max_length) bool: which grid places hold a token."""
        return (self.slot_token < self.num_tokens).view(self.num_texts, self.max_length)


def host_layout(lengths: np.ndarray) -> dict[str, np.ndarray]:
    """The layout's index arrays for texts of these lengths (numpy, on the host)."""
    lengths = lengths.astype(np.int64)
    n, total, longest = len(lengths), int(lengths.sum()), int(lengths.max())
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    text = np.repeat(np.arange(n), lengths)
    within = np.arange(total) - cu[:-1][text]  # each token's position inside its text
    token_slot = text * longest + within
    slot_token = np.full(n * longest, total, dtype=np.int64)
    slot_token[token_slot] = np.arange(total)
    return {"cu": cu, "within": within, "token_slot": token_slot, "slot_token": slot_token, "lengths": lengths}


def pack_chunks(batch: dict[str, Tensor], chunk_rows: list[np.ndarray], lengths: np.ndarray, left_padded: bool) -> list[dict]:
    """Each chunk's rows of a padded batch (input_ids (R, L) on the device) packed into one row:
    model inputs {input_ids (1, T), position_ids (1, T), packed: PackedLayout}.

    The index arrays of every chunk are built with numpy and moved in one copy (pinned, so it
    does not wait for the device on CUDA); each chunk's are views of it."""
    ids = batch["input_ids"]
    width, device = ids.shape[1], ids.device
    parts, plans = [], []
    for rows in chunk_rows:
        lens = lengths[rows]
        layout = host_layout(lens)
        offset = width - lens if left_padded else np.zeros_like(lens)
        text = np.repeat(np.arange(len(rows)), lens)
        source = rows[text] * width + offset[text] + layout["within"]
        arrays = [source, layout["within"], layout["cu"], layout["token_slot"], layout["slot_token"], layout["lengths"]]
        plans.append(([len(a) for a in arrays], int(lens.max())))
        parts += arrays
    flat = torch.from_numpy(np.concatenate(parts))
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    flat_ids = ids.reshape(-1)
    chunks, start = [], 0
    for sizes, longest in plans:
        source, within, cu, token_slot, slot_token, lens = flat[start : start + sum(sizes)].split(sizes)
        start += sum(sizes)
        layout = PackedLayout(cu.to(torch.int32), longest, token_slot, slot_token, lens)
        chunks.append({"input_ids": flat_ids.index_select(0, source).unsqueeze(0), "position_ids": within.unsqueeze(0),
                       "packed": layout})
    return chunks


def pool_packed(hidden: Tensor, layout: PackedLayout, pooling: str) -> Tensor:
    """(T, h) token states of a packed row -> (n, h) fp32 text vectors, as `model.pool` gives for
    the same texts padded."""
    hidden = hidden.float()
    if pooling == "mean":
        # Through the grid, not a scatter-add: a sum in a fixed order, the same in both passes.
        return layout.grid(hidden).sum(1) / layout.lengths.to(hidden.dtype).unsqueeze(1)
    starts = layout.cu_seq_lens[:-1].long()
    if pooling == "cls":
        return hidden.index_select(0, starts)
    if pooling == "last_token":
        return hidden.index_select(0, starts + layout.lengths - 1)
    raise ValueError(f"pooling {pooling!r} has no packed form")


def _varlen_kernel():
    """torch's flash varlen attention, called the same way across the torch releases that have it
    (2.10 took is_causal, later ones window_size; grouped-query attention came with enable_gqa)."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    takes = inspect.signature(varlen_attn).parameters

    def attend(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, longest: int, scale, causal: bool,
               window: tuple[int, int]) -> Tensor | None:
        if k.shape[1] != q.shape[1] and "enable_gqa" not in takes:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        options = {"scale": scale}
        if "window_size" in takes:
            options["window_size"] = window
        elif window != ((-1, 0) if causal else (-1, -1)):
            return None  # a sliding window this release cannot take: the grid path does it
        else:
            options["is_causal"] = causal
        if k.shape[1] != q.shape[1]:
            options["enable_gqa"] = True
        return varlen_attn(q, k, v, cu, cu, longest, longest, **options)

    return attend


_VARLEN = _varlen_kernel()
_FLASH_DTYPES = (torch.float16, torch.bfloat16)  # the flash kernel's; fp32 goes through the grid


def packed_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None, dropout=0.0,
                     packed_layout: PackedLayout | None = None, **kwargs):
    """transformers' attention-function signature: query (b, heads, L, d), key and value
    (b, kv_heads, L, d) -> ((b, L, heads, d), None). Without a layout (a padded batch: evaluation,
    mining) the implementation it replaced runs; with one, attention per text of the packed row."""
    if packed_layout is None:
        original = module.config._attn_implementation.removeprefix(PREFIX)
        return ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask, scaling=scaling,
                                                 dropout=dropout, **kwargs)
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    window = _window(kwargs.get("sliding_window"), causal)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, d)
    out = None
    if q.is_cuda and dropout == 0.0 and _VARLEN is not None and q.dtype in _FLASH_DTYPES:
        out = _VARLEN(q, k, v, packed_layout.cu_seq_lens, packed_layout.max_length, scaling, causal, window)
    if out is None:
        out = _grid_attention(q, k, v, packed_layout, scaling, dropout, window)
    return out.unsqueeze(0), None


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    """(keys before, keys after) a query may see, -1 = all: flash's window_size. transformers passes
    a sliding window in flash's inclusive convention (ModernBERT: its config's half-window + 1,
    Mistral-style decoders: the window), so a query sees sliding_window - 1 keys on either side."""
    reach = sliding_window - 1 if sliding_window else -1
    return (reach, 0) if causal else (reach, reach)


def _grid_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, scaling, dropout: float,
                    window: tuple[int, int]) -> Tensor:
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves a group of query heads
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    qg, kg, vg = (layout.grid(x).transpose(1, 2) for x in (q, k, v))  # (n, heads, longest, d)
    mask = layout.valid()[:, None, None, :]
    before, after = window
    if before >= 0 or after >= 0:
        offset = torch.arange(layout.max_length, device=q.device)
        offset = offset[None, :] - offset[:, None]  # key position - query position
        allowed = torch.ones_like(offset, dtype=torch.bool)
        if before >= 0:
            allowed &= offset >= -before
        if after >= 0:
            allowed &= offset <= after
        mask = mask & allowed
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return layout.ungrid(out.transpose(1, 2))


def _mask_function(original: str):
    """A packed row needs no mask (attention is confined by the layout); a padded batch gets the
    original implementation's. Packed calls pass no attention_mask, so no mask helper looks at
    one in Python (its padding_mask.all() is a host sync on every forward)."""
    original_mask = ALL_MASK_ATTENTION_FUNCTIONS[original]

    def mask(*args, attention_mask=None, **kwargs):
        if attention_mask is None:
            return None
        return original_mask(*args, attention_mask=attention_mask, **kwargs)

    return mask


def supports_packing(backbone) -> bool:
    """Whether the model's attention layers dispatch through transformers' attention interface
    (the model class says so with _supports_attention_backend)."""
    model = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    original = model.config._attn_implementation or "sdpa"
    return bool(getattr(model, "_supports_attention_backend", False)) and (
        original.startswith(PREFIX) or original in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    )


def enable_packed_attention(backbone) -> None:
    """Route the model's attention through packed_attention (padded calls are unchanged)."""
    model = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    original = model.config._attn_implementation or "sdpa"
    if original.startswith(PREFIX):
        return
    name = PREFIX + original
    AttentionInterface.register(name, packed_attention)
    AttentionMaskInterface.register(name, _mask_function(original))
    model.set_attn_implementation(name)
