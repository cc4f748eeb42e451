"""The collate the trainer used before its vectorised one (trainer/data/batches.py), kept as the
reference that the new one must equal tensor for tensor, and as the baseline of
bench/input_speed.py: each row's token ids read into Python lists, then `tokenizer.pad`."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import torch

from trainer.data.batches import _pad_rows, chosen_slots
from trainer.data.cache import SCHEMA


@functools.lru_cache(maxsize=8)
def _record_batches(folders: tuple) -> tuple[list[pa.RecordBatch], np.ndarray]:
    batches = [b for folder in folders for b in pa.ipc.open_stream(pa.memory_map(str(folder / "data.arrow"))).read_all().to_batches()]
    return batches, np.cumsum([0] + [b.num_rows for b in batches])


def arrow_rows(table, indices) -> dict[str, list]:
    """Rows of a cached source read by Arrow itself, one row at a time (not through mapped.py)."""
    batches, starts = _record_batches(tuple(table.folders))
    out = {name: [] for name in batches[0].schema.names}
    for index in np.asarray(indices, dtype=np.int64).tolist():
        b = int(np.searchsorted(starts, index, side="right") - 1)
        for name, values in batches[b].slice(index - int(starts[b]), 1).to_pydict().items():
            out[name].append(values[0])
    return out


def reference_collate(
    data,
    part,
    tokenizer,
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
        records = arrow_rows(data.tables[k], part.row[where])
        have = np.array([len(d) - 1 for d in records["doc_ids"]], dtype=np.int64)
        slots = chosen_slots(have, num_negatives, seed, int(k), part.row[where], part.epoch[where])
        pad_rows = _pad_rows(slots, data.sizes[k], seed, int(k), part.row[where], part.epoch[where])
        padding = arrow_rows(data.tables[k], pad_rows.ravel()) if pad_rows.size else None
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


def cached_rows(table, indices) -> dict[str, list]:
    """Columns (as Python lists) of a CachedRows' rows `indices`, in that order, read back through the
    spans the collate uses: what the cache holds, for comparing with the source rows."""
    indices = np.asarray(indices, dtype=np.int64)
    out = {name: [None] * len(indices) for name in SCHEMA.names}
    (query_parts, query_hash), counts = table.query_spans(indices), table.doc_counts(indices)
    for where, spans in query_parts:
        for j, start, length in zip(where.tolist(), spans.starts.tolist(), spans.lengths.tolist()):
            out["query_ids"][j] = spans.view[start : start + length].tolist()
    out["query_hash"] = query_hash.tolist()
    row_of = np.repeat(np.arange(len(indices)), counts)
    slots = np.arange(len(row_of)) - np.repeat(np.cumsum(counts) - counts, counts)
    doc_parts, doc_hash = table.doc_spans(indices[row_of], slots)
    docs = [None] * len(row_of)
    for where, spans in doc_parts:
        for j, start, length in zip(where.tolist(), spans.starts.tolist(), spans.lengths.tolist()):
            docs[j] = spans.view[start : start + length].tolist()
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    out["doc_ids"] = [docs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    out["doc_hash"] = [doc_hash[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
    has_scores = table.score_counts(indices) > 0
    flat = np.zeros(len(row_of), np.float32)
    scored_docs = np.flatnonzero(has_scores[row_of])
    flat[scored_docs] = table.doc_scores(indices[row_of][scored_docs], slots[scored_docs])
    out["scores"] = [flat[a:b].tolist() if has else [] for has, a, b in zip(has_scores, bounds[:-1], bounds[1:])]
    return out
