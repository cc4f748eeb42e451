"""Model inputs for one step: this rank's rows read from the memory-mapped caches, hard negatives
chosen, padded into tensors (with each text's length on the host, for GradCache's plan).

Hard negatives: a row that has more than `num_negatives` gets a seeded choice of that many, drawn
anew each epoch of its source (more of the mined list gets used over a run); a row with exactly
that many uses them in order; a row with fewer is either refused before training starts
(`missing_negatives=error`) or topped up with the positives of other rows of its source drawn
at random (`pad`), which are in-batch-style negatives; should one be the row's own positive
text, duplicate masking removes it from the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from trainer.core.chunk_plan import LENGTHS, HostLengths
from trainer.data.cache import CachedRows
from trainer.data.hashing import mix64
from trainer.data.mapped import PaddedTokens
from trainer.data.sampling import BatchRows, GlobalBatches, hash_key


@dataclass
class TrainingData:
    """The prepared sources: one memory-mapped table and name per source."""

    names: list[str]
    tables: list[CachedRows]  # per source, rows in file order
    min_negatives: list[int]
    scored_rows: list[int] | None = None  # per source, rows with teacher scores

    @property
    def has_scores(self) -> bool:
        """Every row of every source has teacher scores: batches then carry them."""
        return self.scored_rows is not None and self.scored_rows == self.sizes

    @property
    def sizes(self) -> list[int]:
        return [len(t) for t in self.tables]

    def __len__(self) -> int:
        return sum(self.sizes)


def chosen_slots(have: np.ndarray, want: int, seed: int, source: int, rows: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """(b, want) indices into each row's negatives (-1 = a slot to pad): all of them in order when
    a row has exactly `want`, else a seeded per-(row, epoch) choice of `want` among them."""
    b = len(have)
    if want == 0:
        return np.zeros((b, 0), dtype=np.int64)
    width = max(int(have.max()) if b else 0, want)
    row_keys = mix64(rows.astype(np.uint64) * np.uint64(0x9E3779B1) ^ epochs.astype(np.uint64) << np.uint64(40)
                    ^ np.uint64(hash_key(seed, source, 0xE6)))
    keys = mix64(row_keys[:, None] ^ (np.arange(width, dtype=np.uint64)[None, :] + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03))
    keys[np.arange(width)[None, :] >= have[:, None]] = np.iinfo(np.uint64).max  # slots a row does not have
    choice = np.argsort(keys, axis=1, kind="stable")[:, :want]
    choice = np.where(np.arange(want)[None, :] < have[:, None], choice, -1)
    in_order = have == want
    choice[in_order] = np.arange(want)
    return choice


def collate(
    data: TrainingData,
    part: BatchRows,
    tokenizer: PreTrainedTokenizerBase,
    num_negatives: int,
    seed: int,
) -> dict:
    """Pad the chosen rows into model inputs: b queries, b * (1 + n) docs grouped by query (each
    row's positive, then its negatives). Vectorised over the batch (mapped.py): the same tensors
    as `tokenizer.pad` over each row's token ids, at ~30x the speed. When every row has teacher
    scores, "teacher_scores" (b, 1 + n) holds the chosen documents' (nan for a padded slot: no
    teacher scored another row's positive against this query)."""
    b, group = len(part.row), 1 + num_negatives
    queries, docs = PaddedTokens(b), PaddedTokens(b * group)
    query_hash, doc_hash = np.zeros(b, dtype=np.int64), np.zeros(b * group, dtype=np.int64)
    teacher = np.full(b * group, np.nan, dtype=np.float32) if data.has_scores else None
    for k in np.unique(part.source).tolist():
        where = np.flatnonzero(part.source == k)
        table, rows, epochs = data.tables[k], part.row[where], part.epoch[where]
        parts, query_hash[where] = table.query_spans(rows)
        for positions, spans in parts:
            queries.add(where[positions], spans)
        # Each output document: (row of this source, its slot there). Slot 0 is the positive; a
        # chosen negative i is slot 1 + i; a slot to pad takes the positive of a random row.
        slots = chosen_slots(table.doc_counts(rows) - 1, num_negatives, seed, k, rows, epochs)
        negative_rows, negative_slots = np.repeat(rows[:, None], num_negatives, axis=1), 1 + slots
        missing = slots < 0
        if missing.any():
            negative_rows[missing] = _pad_rows(slots, data.sizes[k], seed, k, rows, epochs)[missing]
            negative_slots[missing] = 0
        doc_rows = np.concatenate([rows[:, None], negative_rows], axis=1)
        doc_slots = np.concatenate([np.zeros((len(rows), 1), dtype=np.int64), negative_slots], axis=1)
        out = (where[:, None] * group + np.arange(group)[None, :]).ravel()
        parts, doc_hash[out] = table.doc_spans(doc_rows.ravel(), doc_slots.ravel())
        for positions, spans in parts:
            docs.add(out[positions], spans)
        if teacher is not None:
            own = np.concatenate([np.ones((len(rows), 1), dtype=bool), ~missing], axis=1).ravel()
            teacher[out[own]] = table.doc_scores(doc_rows.ravel()[own], doc_slots.ravel()[own])
    pad_id, left = _padding(tokenizer)
    query_ids, query_mask = queries.build(pad_id, left)
    doc_ids, doc_mask = docs.build(pad_id, left)
    # The lengths ride along on the host, so that GradCache plans its chunks without reading the
    # masks back from the device.
    return {
        "queries": {"input_ids": torch.from_numpy(query_ids), "attention_mask": torch.from_numpy(query_mask),
                    LENGTHS: HostLengths(queries.lengths.astype(np.int64), left)},
        "docs": {"input_ids": torch.from_numpy(doc_ids), "attention_mask": torch.from_numpy(doc_mask),
                 LENGTHS: HostLengths(docs.lengths.astype(np.int64), left)},
        "query_hashes": torch.from_numpy(query_hash),
        "doc_hashes": torch.from_numpy(doc_hash.reshape(b, group)),
        **({"teacher_scores": torch.from_numpy(teacher.reshape(b, group))} if teacher is not None else {}),
    }


def _padding(tokenizer: PreTrainedTokenizerBase) -> tuple[int, bool]:
    """The pad id and side `tokenizer.pad` would use."""
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {tokenizer.name_or_path!r} has no padding token (set tokenizer.pad_token)")
    return int(tokenizer.pad_token_id), tokenizer.padding_side == "left"


def _pad_rows(slots: np.ndarray, size: int, seed: int, source: int, rows: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """For every slot: a random row of the source whose positive fills it (only where slot is -1;
    a dense array of row ids, one per slot, so that one read serves the batch)."""
    if not (slots < 0).any():
        return np.zeros((0,), dtype=np.int64)
    keys = mix64((rows.astype(np.uint64) << np.uint64(20)) ^ epochs.astype(np.uint64) ^ np.uint64(hash_key(seed, source, 0xAD)))
    per_slot = mix64(keys[:, None] + np.arange(slots.shape[1], dtype=np.uint64)[None, :])
    return (per_slot % np.uint64(size)).astype(np.int64)


class StepBatches(torch.utils.data.Dataset):
    """This rank's collated batch for each step from first_step to total_steps - 1, so that a
    DataLoader can prepare them in worker processes (data.num_workers)."""

    def __init__(
        self,
        data: TrainingData,
        batches: GlobalBatches,
        tokenizer: PreTrainedTokenizerBase,
        num_negatives: int,
        first_step: int,
        total_steps: int,
    ) -> None:
        self.data, self.batches, self.tokenizer, self.num_negatives = data, batches, tokenizer, num_negatives
        self.first_step, self.total_steps = first_step, total_steps

    def __len__(self) -> int:
        return max(self.total_steps - self.first_step, 0)

    def __getitem__(self, index: int) -> dict:
        part = self.batches.batch_rows(self.first_step + index)
        return collate(self.data, part, self.tokenizer, self.num_negatives, self.batches.seed)
