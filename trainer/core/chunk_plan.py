"""The chunks one GradCache pass forwards, planned on the host.

A plan needs each text's length. The collate knows them (a tokenised batch may carry them as
`HostLengths` under the key "lengths"); otherwise they are read from the attention mask in one
device-to-host copy per side. Everything after that, the order, the chunk boundaries, each
chunk's width or packed layout, is numpy on the host: no `.tolist()`, `.item()` or `nonzero()`
per chunk, so a step with many chunks queues its kernels without waiting for the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trainer.core.packing import pack_chunks

Batch = Mapping[str, Tensor]
LENGTHS = "lengths"
"""The key of a tokenised batch that holds its HostLengths (never fed to the model)."""


@dataclass(frozen=True)
class HostLengths:
    """Each text's number of real tokens, on the host, and the side its padding is on."""

    lengths: np.ndarray
    left_padded: bool = False

    def to(self, *args, **kwargs) -> HostLengths:
        """Stays on the host when a batch is moved to a device."""
        return self

    def pin_memory(self) -> HostLengths:
        return self


@dataclass(frozen=True)
class Plan:
    """Chunks of one side of a batch: rows `order` of the batch (None = its own order) cut into
    `chunks` (model inputs), with what each costs."""

    order: Tensor | None
    chunks: list[dict]
    real_tokens: np.ndarray
    """(chunks,) real tokens of each chunk."""
    computed_tokens: np.ndarray
    """(chunks,) tokens each chunk's forward computes (padding included)."""
    attention_pairs: np.ndarray
    """(chunks,) sum over the chunk's texts of length^2 (what attention costs grow with)."""


def tensors_and_lengths(batch: Batch) -> tuple[dict[str, Tensor], HostLengths]:
    """The model's tensors of a tokenised batch, and its texts' lengths on the host."""
    tensors = {key: value for key, value in batch.items() if key != LENGTHS}
    known = batch.get(LENGTHS)
    return tensors, known if known is not None else lengths_from_mask(tensors)


def lengths_from_mask(batch: Batch) -> HostLengths:
    """Lengths and padding side from the attention mask: one copy to the host."""
    mask = batch.get("attention_mask")
    if mask is None:
        ids = batch["input_ids"]
        return HostLengths(np.full(ids.shape[0], ids.shape[1], dtype=np.int64))
    facts = torch.stack([mask.sum(dim=1), mask[:, 0], mask[:, -1]]).cpu().numpy().astype(np.int64)
    lengths, first, last = facts
    return HostLengths(lengths, left_padded=bool(((first == 0) & (last != 0)).any()))


def plan_chunks(
    batch: Batch,
    chunk_size: int | None = None,
    chunk_tokens: int | None = None,
    sort_by_length: bool = True,
    trim_padding: bool = True,
    pack: bool = False,
) -> Plan:
    """Chunks of at most chunk_size rows and, with chunk_tokens, at most that many tokens: padded
    tokens (rows x the chunk's longest row) for padded chunks, real tokens for packed ones (a
    text longer than the budget goes alone). Short texts go in big chunks, long ones in small.

    sort_by_length: longest first, so that a chunk's texts are of about one length (real text:
    46% padding -> 5% at 4096 x chunk 256). trim_padding: a padded chunk drops the trailing
    columns that are padding in all its rows (real tokens keep their positions: the output is
    unchanged). pack: each chunk's texts in one row of real tokens (packing.py), no padding.
    """
    tensors, known = tensors_and_lengths(batch)
    lengths = known.lengths
    rows = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(len(lengths))
    sizes = chunk_sizes(lengths[rows], chunk_size, chunk_tokens, padded=not pack)
    bounds = np.cumsum([0, *sizes])
    chunk_rows = [rows[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
    real = np.array([lengths[r].sum() for r in chunk_rows], dtype=np.int64)
    pairs = np.array([(lengths[r] ** 2).sum() for r in chunk_rows], dtype=np.int64)
    if pack:
        return Plan(_device_order(rows, tensors, sort_by_length), pack_chunks(tensors, chunk_rows, lengths, known.left_padded),
                    real, real.copy(), pairs)
    order = _device_order(rows, tensors, sort_by_length)
    ordered = tensors if order is None else {k: v.index_select(0, order) for k, v in tensors.items()}
    width = next(iter(tensors.values())).shape[1]
    chunks, computed = [], []
    for start, end, members in zip(bounds[:-1], bounds[1:], chunk_rows):
        chunk = {key: value[start:end] for key, value in ordered.items()}
        used = width if known.left_padded or not trim_padding else max(int(lengths[members].max()), 1)
        if used < width:
            chunk = {k: v[:, :used] if v.dim() == 2 else v for k, v in chunk.items()}
        chunks.append(chunk)
        computed.append(len(members) * used)
    return Plan(order, chunks, real, np.array(computed, dtype=np.int64), pairs)


def chunk_sizes(lengths: np.ndarray, chunk_size: int | None, chunk_tokens: int | None, padded: bool = True) -> list[int]:
    """Greedy: a chunk grows while it stays within chunk_size rows and chunk_tokens tokens (padded:
    rows x the longest; packed: the sum of lengths)."""
    sizes, rows, cost, longest = [], 0, 0, 0
    for length in lengths.tolist():  # one conversion for the whole side, not one per chunk
        grown = max(longest, length)
        grown_cost = (rows + 1) * grown if padded else cost + length
        full = (chunk_size and rows + 1 > chunk_size) or (chunk_tokens and grown_cost > chunk_tokens)
        if rows and full:
            sizes.append(rows)
            rows, grown, grown_cost = 0, length, length
        rows, longest, cost = rows + 1, grown, grown_cost
    return sizes + [rows] if rows else sizes


def _device_order(rows: np.ndarray, tensors: dict[str, Tensor], sort_by_length: bool) -> Tensor | None:
    """The chunks' row order as a device tensor (None when it is the batch's own order)."""
    if not sort_by_length or np.array_equal(rows, np.arange(len(rows))):
        return None
    device = next(iter(tensors.values())).device
    order = torch.from_numpy(rows)
    if device.type == "cuda":
        order = order.pin_memory()
    return order.to(device, non_blocking=True)


def in_batch_order(sorted_rows: Tensor, order: Tensor | None) -> Tensor:
    """Rows computed in `order` back in the batch's own order."""
    if order is None:
        return sorted_rows
    return torch.empty_like(sorted_rows).index_copy_(0, order, sorted_rows)
