"""Model inputs for one step: this rank's rows read from the memory-mapped caches, hard negatives
chosen, padded into tensors.

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

from trainer.data.cache import CachedRows
from trainer.data.sampling import BatchRows, GlobalBatches, _mix, hash_key


@dataclass
class TrainingData:
    """The prepared sources: one memory-mapped table and name per source."""

    names: list[str]
    tables: list[CachedRows]  # per source, rows in file order
    min_negatives: list[int]

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
    row_keys = _mix(rows.astype(np.uint64) * np.uint64(0x9E3779B1) ^ epochs.astype(np.uint64) << np.uint64(40)
                    ^ np.uint64(hash_key(seed, source, 0xE6)))
    keys = _mix(row_keys[:, None] ^ (np.arange(width, dtype=np.uint64)[None, :] + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03))
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
    """Pad the chosen rows into model inputs: b queries, b * (1 + n) docs grouped by query."""
    b = len(part.row)
    query_ids, query_hash = [None] * b, np.zeros(b, dtype=np.int64)
    doc_ids = [[None] * (1 + num_negatives) for _ in range(b)]
    doc_hash = np.zeros((b, 1 + num_negatives), dtype=np.int64)
    for k in np.unique(part.source):
        where = np.flatnonzero(part.source == k)
        records = data.tables[k].rows(part.row[where])
        have = np.array([len(d) - 1 for d in records["doc_ids"]], dtype=np.int64)
        slots = chosen_slots(have, num_negatives, seed, int(k), part.row[where], part.epoch[where])
        pad_rows = _pad_rows(slots, data.sizes[k], seed, int(k), part.row[where], part.epoch[where])
        padding = data.tables[k].rows(pad_rows.ravel()) if pad_rows.size else None
        for i, position in enumerate(where):
            query_ids[position], query_hash[position] = records["query_ids"][i], records["query_hash"][i]
            doc_ids[position][0], doc_hash[position, 0] = records["doc_ids"][i][0], records["doc_hash"][i][0]
            for j, slot in enumerate(slots[i]):
                if slot >= 0:
                    doc_ids[position][1 + j] = records["doc_ids"][i][1 + slot]
                    doc_hash[position, 1 + j] = records["doc_hash"][i][1 + slot]
                else:
                    flat = i * num_negatives + j
                    doc_ids[position][1 + j] = padding["doc_ids"][flat][0]
                    doc_hash[position, 1 + j] = padding["doc_hash"][flat][0]
    queries = tokenizer.pad({"input_ids": query_ids}, return_tensors="pt")
    docs = tokenizer.pad({"input_ids": [ids for group in doc_ids for ids in group]}, return_tensors="pt")
    return {
        "queries": {"input_ids": queries["input_ids"], "attention_mask": queries["attention_mask"]},
        "docs": {"input_ids": docs["input_ids"], "attention_mask": docs["attention_mask"]},
        "query_hashes": torch.from_numpy(query_hash),
        "doc_hashes": torch.from_numpy(doc_hash),
    }


def _pad_rows(slots: np.ndarray, size: int, seed: int, source: int, rows: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """For every slot: a random row of the source whose positive fills it (only where slot is -1;
    a dense array of row ids, one per slot, so that one read serves the batch)."""
    if not (slots < 0).any():
        return np.zeros((0,), dtype=np.int64)
    keys = _mix((rows.astype(np.uint64) << np.uint64(20)) ^ epochs.astype(np.uint64) ^ np.uint64(hash_key(seed, source, 0xAD)))
    per_slot = _mix(keys[:, None] + np.arange(slots.shape[1], dtype=np.uint64)[None, :])
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
