"""Vectorised reads of one token-cache file: token spans and hashes of any rows, as numpy arrays.

Why not Arrow's own per-row access: a batch of 4096 rows read row by row into Python lists and
padded by `tokenizer.pad` runs at 7-10K pairs/s per core, about what one H100 encodes, so the GPU
would wait for Python. Here the file's memory map is viewed once as int32 and int64 numpy arrays,
and each Arrow record batch is reduced to the positions of its buffers in those views (a few
integers per batch, nothing per row). A row's tokens are then found with two fancy indexes
(offsets, then values), for all rows of a step at once, and copied straight into the padded
output. Nothing is read that the step does not use, and nothing per row is held.

The cache is written by cache.py with no nulls and unsliced arrays. Arrow aligns every IPC
buffer to 8 bytes, so each buffer is a whole number of int32 or int64 elements from the start
of the map. Both facts are checked when a file is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

# Per record batch, where each buffer starts in the views: (view, column, buffer index).
_BUFFERS = {
    "query_offsets": (np.int32, "query_ids", 1),
    "query_values": (np.int32, "query_ids", 3),
    "doc_rows": (np.int32, "doc_ids", 1),  # row -> its first document (positive, then negatives)
    "doc_offsets": (np.int32, "doc_ids", 3),  # document -> its first token
    "doc_values": (np.int32, "doc_ids", 5),
    "query_hash": (np.int64, "query_hash", 1),
    "hash_rows": (np.int32, "doc_hash", 1),
    "doc_hash": (np.int64, "doc_hash", 3),
    "score_rows": (np.int32, "scores", 1),
    "scores": (np.float32, "scores", 3),
}


@dataclass(frozen=True)
class Spans:
    """Token sequences inside one file's int32 view: where each starts and how many tokens."""

    view: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


class MappedCacheFile:
    """One data.arrow of the token cache, memory-mapped, with vectorised row reads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        source = pa.memory_map(str(self.path))
        self._map = source.read_buffer(source.size())  # zero-copy: the whole map, which keeps it alive
        source.seek(0)
        batches = pa.ipc.open_stream(source).read_all().to_batches()
        self.int32 = np.frombuffer(self._map, dtype=np.int32, count=self._map.size // 4)
        self.int64 = np.frombuffer(self._map, dtype=np.int64, count=self._map.size // 8)
        self.float32 = np.frombuffer(self._map, dtype=np.float32, count=self._map.size // 4)
        self.batch_starts = np.cumsum([0] + [b.num_rows for b in batches]).astype(np.int64)
        self.positions = {name: np.zeros(len(batches), dtype=np.int64) for name in _BUFFERS}
        for k, batch in enumerate(batches):
            for name, (dtype, column, index) in _BUFFERS.items():
                self.positions[name][k] = self._position(batch, column, index, np.dtype(dtype).itemsize)

    def __len__(self) -> int:
        return int(self.batch_starts[-1])

    def _position(self, batch: pa.RecordBatch, column: str, index: int, itemsize: int) -> int:
        array = batch.column(column)
        nested = [array] + ([array.values] if pa.types.is_list(array.type) else [])
        if any(a.offset or a.null_count for a in nested):
            raise ValueError(f"{self.path}: column {column} is sliced or has nulls; delete the cache entry to rebuild it")
        buffer = array.buffers()[index]
        if buffer is None or buffer.size == 0:  # nothing to read (e.g. no row has teacher scores)
            return 0
        where = buffer.address - self._map.address
        if not 0 <= where <= self._map.size - buffer.size or where % itemsize:
            raise ValueError(f"{self.path}: column {column} is not an aligned part of the memory map")
        return where // itemsize

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(record batch, row within it) of each file row."""
        batch = np.searchsorted(self.batch_starts, rows, side="right") - 1
        return batch, rows - self.batch_starts[batch]

    def query_spans(self, rows: np.ndarray) -> tuple[Spans, np.ndarray]:
        """The rows' query tokens, and their query hashes."""
        batch, i = self._locate(rows)
        at = self.positions["query_offsets"][batch] + i
        first, end = self.int32[at], self.int32[at + 1]
        spans = Spans(self.int32, self.positions["query_values"][batch] + first, (end - first).astype(np.int64))
        return spans, self.int64[self.positions["query_hash"][batch] + i]

    def doc_counts(self, rows: np.ndarray) -> np.ndarray:
        """Documents per row: its positive plus its hard negatives."""
        batch, i = self._locate(rows)
        at = self.positions["doc_rows"][batch] + i
        return (self.int32[at + 1] - self.int32[at]).astype(np.int64)

    def doc_spans(self, rows: np.ndarray, slots: np.ndarray) -> tuple[Spans, np.ndarray]:
        """Document `slots[j]` of row `rows[j]` (0 = the positive, 1 + i = hard negative i): its
        tokens and its text hash."""
        batch, i = self._locate(rows)
        doc = self.int32[self.positions["doc_rows"][batch] + i] + slots
        at = self.positions["doc_offsets"][batch] + doc
        first, end = self.int32[at], self.int32[at + 1]
        spans = Spans(self.int32, self.positions["doc_values"][batch] + first, (end - first).astype(np.int64))
        hash_at = self.int32[self.positions["hash_rows"][batch] + i] + slots
        return spans, self.int64[self.positions["doc_hash"][batch] + hash_at]


    def score_counts(self, rows: np.ndarray) -> np.ndarray:
        """Teacher scores per row (0 for a row without)."""
        batch, i = self._locate(rows)
        at = self.positions["score_rows"][batch] + i
        return (self.int32[at + 1] - self.int32[at]).astype(np.int64)

    def doc_scores(self, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """The teacher score of document `slots[j]` of row `rows[j]` (rows that have scores)."""
        batch, i = self._locate(rows)
        at = self.int32[self.positions["score_rows"][batch] + i] + slots
        return self.float32[self.positions["scores"][batch] + at]


class PaddedTokens:
    """Fills a (rows, longest) id matrix and its attention mask from spans, with no loop per row:
    what `tokenizer.pad` returns for the same ids (int64, padded on the tokenizer's side)."""

    def __init__(self, rows: int) -> None:
        self.lengths = np.zeros(rows, dtype=np.int64)
        self._parts: list[tuple[np.ndarray, Spans]] = []

    def add(self, positions: np.ndarray, spans: Spans) -> None:
        """Output rows `positions` get the spans' tokens."""
        self.lengths[positions] = spans.lengths
        self._parts.append((positions, spans))

    def build(self, pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
        rows = len(self.lengths)
        width = int(self.lengths.max()) if rows else 0
        ids = np.full((rows, width), pad_id, dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        for positions, spans in self._parts:
            lengths = spans.lengths
            total = int(lengths.sum())
            row = np.repeat(positions, lengths)
            within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            column = within + np.repeat(width - lengths, lengths) if left else within
            flat = row * width + column
            ids.reshape(-1)[flat] = spans.view[np.repeat(spans.starts, lengths) + within]
            mask.reshape(-1)[flat] = 1
        return ids, mask
