"""Mining's input read once, on one rank, into files every rank memory-maps (no texts in memory).

- `pool.arrow`: the candidate pool, every positive of the input then every corpus document, each
  distinct text once, in first-seen order (its position is its pool id);
- `queries.arrow`: the distinct queries, in first-seen order (query ids);
- `row_query.npy`, `row_positive.npy`: each input row's query id and its positive's pool id;
- `excluded.npy`: sorted keys query_id * pool_size + pool_id of the (query, text) pairs never used
  as negatives: each query's positives and the query text itself;
- `pool.json`: the sizes, written last (the folder is complete when it exists).

Texts are told apart by a 64-bit hash (blake2b), so that deduplication holds 8 bytes per row,
not a dictionary of strings: two distinct texts collide with probability about n^2 / 2^65
(3e-6 for 10M texts). The input is read twice (hashes, then the texts at first occurrences),
a batch at a time, through the same Arrow path training uses.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data import Columns, DataError
from trainer.data.hashing import text_hashes
from trainer.data.records import jsonl_records
from trainer.data.sources import text_batches
from trainer.eval.beir import corpus_text
from trainer.retrieval.text_store import TextStore, write_texts

CORPUS_BATCH = 65536
DONE_FILE = "pool.json"


def corpus_batches(spec) -> Iterator[list[str]]:
    """Non-blank documents from a BEIR corpus.jsonl ({title, text}), a .jsonl of {text}, or a .txt
    file (one per line), a batch at a time; spec is a path or a list of paths."""
    for path in [spec] if isinstance(spec, str) else list(spec or []):
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{path}: no such file (corpus must be .jsonl, .jsonl.gz or .txt files)")
        batch: list[str] = []
        for text in _corpus_texts(p):
            if text.strip():
                batch.append(text)
            if len(batch) == CORPUS_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def _corpus_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as lines:
            yield from (line.strip() for line in lines)
        return
    for where, record in jsonl_records(path):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{path}: {where}: field 'text' is missing or not a string")
        yield corpus_text(record)


def _first_seen(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(id of each item: the rank of its hash's first occurrence among distinct hashes, and a mask
    of the first occurrences)."""
    unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    id_of_unique = np.empty(len(unique), dtype=np.int64)
    id_of_unique[np.argsort(first, kind="stable")] = np.arange(len(unique))
    is_first = np.zeros(len(hashes), dtype=bool)
    is_first[first] = True
    return id_of_unique[inverse.reshape(-1)], is_first


def build(folder: Path, input_path: str, columns: Columns, corpus) -> None:
    """Read the input and the corpus into folder's files (see the module's docstring)."""
    query_hashes, positive_hashes = [], []
    for table in text_batches(input_path, columns):
        query_hashes.append(text_hashes(table.column("query").to_pylist()))
        positive_hashes.append(text_hashes(table.column("positive").to_pylist()))
    corpus_hashes = [text_hashes(batch) for batch in corpus_batches(corpus)]
    row_query, query_first = _first_seen(np.concatenate(query_hashes) if query_hashes else np.zeros(0, np.uint64))
    if not len(row_query):
        raise DataError(f"{input_path}: no rows")
    positives = np.concatenate(positive_hashes)
    pool_hashes = np.concatenate([positives, *corpus_hashes])
    pool_id, pool_first = _first_seen(pool_hashes)
    rows = len(row_query)
    row_positive = pool_id[:rows]

    def firsts(texts_of_batches: Iterator[list[str]], mask: np.ndarray) -> Iterator[list[str]]:
        start = 0
        for texts in texts_of_batches:
            keep = mask[start : start + len(texts)]
            yield [t for t, k in zip(texts, keep) if k]
            start += len(texts)

    pool_size = write_texts(folder / "pool.arrow", itertools.chain(
        firsts((t.column("positive").to_pylist() for t in text_batches(input_path, columns)), pool_first[:rows]),
        firsts(corpus_batches(corpus), pool_first[rows:])))
    write_texts(folder / "queries.arrow",
                firsts((t.column("query").to_pylist() for t in text_batches(input_path, columns)), query_first))
    # The query text itself is never its own negative: its pool id, where it is in the pool.
    distinct_query_hashes = np.concatenate(query_hashes)[query_first]
    sorted_pool = np.argsort(pool_hashes, kind="stable")
    where = np.clip(np.searchsorted(pool_hashes[sorted_pool], distinct_query_hashes), 0, len(pool_hashes) - 1)
    in_pool = pool_hashes[sorted_pool[where]] == distinct_query_hashes
    self_keys = np.flatnonzero(in_pool) * pool_size + pool_id[sorted_pool[where[in_pool]]]
    excluded = np.unique(np.concatenate([row_query * pool_size + row_positive, self_keys]))
    np.save(folder / "row_query.npy", row_query)
    np.save(folder / "row_positive.npy", row_positive)
    np.save(folder / "excluded.npy", excluded)
    per_query = np.bincount(excluded // pool_size, minlength=int(query_first.sum()))
    sizes = {"rows": rows, "queries": int(query_first.sum()), "pool": pool_size, "most_excluded": int(per_query.max())}
    (folder / DONE_FILE).write_text(json.dumps(sizes))


class MappedArray:
    """A .npy file read through a memory map that lives for one read only. A map held for the
    whole run would count every page ever read in this process's RSS: the row arrays are read a
    block at a time, so by the end, all of them (O(rows), 240 MB at 10M rows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self.mapped() as table:
            self.shape, self.dtype = table.shape, table.dtype

    @contextmanager
    def mapped(self) -> Iterator[np.ndarray]:
        table = np.load(self.path, mmap_mode="r")
        try:
            yield table
        finally:
            del table  # the last reference: the map closes, its pages leave RSS

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        with self.mapped() as table:
            return np.array(table[index])  # a copy: no view may outlive the map


@dataclass
class MiningInput:
    """The files of build(), each read through a short-lived memory map."""

    rows: int
    pool_size: int
    most_excluded: int  # the most (query, text) pairs excluded for one query
    pool: TextStore
    queries: TextStore
    row_query: MappedArray
    row_positive: MappedArray
    excluded: MappedArray

    @classmethod
    def open(cls, folder: Path) -> MiningInput:
        sizes = json.loads((folder / DONE_FILE).read_text())
        load = lambda name: MappedArray(folder / f"{name}.npy")
        return cls(sizes["rows"], sizes["pool"], sizes["most_excluded"], TextStore(folder / "pool.arrow"),
                   TextStore(folder / "queries.arrow"), load("row_query"), load("row_positive"), load("excluded"))

    def excluded_of(self, query_ids: np.ndarray) -> np.ndarray:
        """The excluded keys of these queries (sorted distinct ids), sorted: each query's run of
        the sorted keys, found by binary search (a block never reads the whole array)."""
        query_ids = np.asarray(query_ids, dtype=np.int64)
        with self.excluded.mapped() as excluded:
            lo = np.searchsorted(excluded, query_ids * self.pool_size)
            counts = np.searchsorted(excluded, (query_ids + 1) * self.pool_size) - lo
            offsets = np.repeat(lo - (np.cumsum(counts) - counts), counts)
            return np.array(excluded[offsets + np.arange(int(counts.sum()))])
