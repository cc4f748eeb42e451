"""Training pairs: load and validate the files, tokenise once, and cut world-size-invariant batches.

Every rank computes the same seeded permutation of the rows for each epoch; global batch k is the
k-th slice of it, and rank r takes the r-th contiguous part of that slice. So 1 process with
batch B and N processes with B / N each see exactly the same global batches, and the position in
the data is just (epoch, batch index): resuming needs nothing else.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

FILE_FORMATS = {".jsonl": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Bad training or evaluation data: the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class Columns:
    """Where the texts are (the data.* column settings)."""

    query: str = "query"
    positive: str = "positive"
    negatives: str = "negatives"
    negative_prefix: str = "negative_"
    num_negatives: int | None = None


@dataclass
class Pairs:
    """Validated training rows: docs[i] = [positive, hard negative 1, ..., hard negative n]."""

    queries: list[str]
    docs: list[list[str]]

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def num_negatives(self) -> int:
        return len(self.docs[0]) - 1 if self.docs else 0


def text_hash(text: str) -> int:
    """A stable signed 64-bit hash of a text (duplicate masking compares these across ranks)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


# ---------------------------------------------------------------------------------- loading


def load_pairs(sources: list[str], columns: Columns) -> Pairs:
    """Read and validate every source; raise one DataError at the first problem found."""
    if not sources:
        raise DataError("data.train is empty: give at least one file, folder or dataset name")
    per_source = [(source, _validated_rows(source, columns)) for source in sources]
    counts = {source: min(len(d) for _, d in rows) - 1 for source, rows in per_source if rows}
    if not counts:
        raise DataError(f"no training rows in {', '.join(sources)}")
    available = min(counts.values())
    n = available if columns.num_negatives is None else columns.num_negatives
    if n > available:
        source = min(counts, key=counts.get)
        raise DataError(f"{source}: data.num_negatives={n}, but some rows have only {available} hard negatives")
    queries, docs = [], []
    for _, rows in per_source:
        for query, row_docs in rows:
            queries.append(query)
            docs.append(row_docs[: 1 + n])
    return Pairs(queries, docs)


def _validated_rows(source: str, columns: Columns) -> list[tuple[str, list[str]]]:
    path = Path(source)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if path.is_dir():
        records = ((f"row {i}", row) for i, row in enumerate(datasets.load_from_disk(str(path))))
    elif suffix in (".jsonl", ".jsonl.gz", ".json"):
        _exists(path)
        records = jsonl_records(path)
    elif suffix in (".parquet", ".csv"):
        _exists(path)
        table = datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(path), split="train")
        first_line = 2 if suffix == ".csv" else 0  # csv: line 1 is the header
        label = "line" if suffix == ".csv" else "row"
        records = ((f"{label} {i + first_line}", row) for i, row in enumerate(table))
    elif path.suffix or source.startswith((".", "/", "~")) or path.exists():
        raise DataError(f"{source}: not a supported training file (.jsonl, .jsonl.gz, .parquet, .csv) or folder")
    else:
        records = ((f"row {i}", row) for i, row in enumerate(_hub_dataset(source)))
    return [_row_texts(source, where, record, columns) for where, record in records]


def _exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")


def jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """('line N', object) for each non-blank line of a .jsonl or .jsonl.gz file; DataError on a bad line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
            yield f"line {number}", record


def _hub_dataset(name: str):
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as err:  # the hub client raises many kinds; the user needs the name and the cause
        raise DataError(f"{name}: not a local path, and loading it as a hub dataset failed: {err}") from None


def _row_texts(source: str, where: str, record: dict, columns: Columns) -> tuple[str, list[str]]:
    def text(field: str, value) -> str:
        if value is None:
            raise DataError(f"{source}: {where}: field '{field}' is missing")
        if not isinstance(value, str):
            raise DataError(f"{source}: {where}: field '{field}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{source}: {where}: field '{field}' is empty")
        return value

    docs = [text(columns.positive, record.get(columns.positive))]
    if columns.negatives in record and record[columns.negatives] is not None:
        negatives = record[columns.negatives]
        if not isinstance(negatives, list):
            raise DataError(
                f"{source}: {where}: field '{columns.negatives}' must be a list of strings, got {type(negatives).__name__}"
            )
        docs += [text(f"{columns.negatives}[{i}]", value) for i, value in enumerate(negatives)]
    k = 1
    while f"{columns.negative_prefix}{k}" in record:
        name = f"{columns.negative_prefix}{k}"
        docs.append(text(name, record[name]))
        k += 1
    return text(columns.query, record.get(columns.query)), docs


# ---------------------------------------------------------------------------- tokenising


@dataclass
class TokenisedPairs:
    """Token ids (unpadded) and text hashes of every row, in a `datasets.Dataset`."""

    table: datasets.Dataset  # columns: query_ids, doc_ids (list of 1+n lists), query_hash, doc_hash
    num_negatives: int

    def __len__(self) -> int:
        return len(self.table)


def tokenise(
    pairs: Pairs,
    tokenizer: PreTrainedTokenizerBase,
    query_max_length: int,
    doc_max_length: int,
    query_prefix: str = "",
    doc_prefix: str = "",
) -> TokenisedPairs:
    table = datasets.Dataset.from_dict({"query": pairs.queries, "docs": pairs.docs})

    def encode(rows):
        queries = [query_prefix + q for q in rows["query"]]
        flat_docs = [doc_prefix + d for docs in rows["docs"] for d in docs]
        query_ids = tokenizer(queries, truncation=True, max_length=query_max_length)["input_ids"]
        doc_ids = tokenizer(flat_docs, truncation=True, max_length=doc_max_length)["input_ids"]
        per_row = len(rows["docs"][0])
        return {
            "query_ids": query_ids,
            "doc_ids": [doc_ids[i : i + per_row] for i in range(0, len(doc_ids), per_row)],
            # Hashes of the raw texts: two rows with the same text are the same example.
            "query_hash": [text_hash(q) for q in rows["query"]],
            "doc_hash": [[text_hash(d) for d in docs] for docs in rows["docs"]],
        }

    table = table.map(encode, batched=True, batch_size=2048, remove_columns=["query", "docs"])
    return TokenisedPairs(table.with_format("python"), pairs.num_negatives)


# ------------------------------------------------------------------------------ batching


@dataclass(frozen=True)
class GlobalBatches:
    """The seeded sequence of global batches, and each rank's share of them."""

    num_rows: int
    batch_size: int  # global
    seed: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.batch_size % self.world_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is the global batch and must divide evenly over "
                f"{self.world_size} ranks"
            )
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.batch_size={self.batch_size} is larger than the {self.num_rows} training rows")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.batch_size  # the incomplete last batch is dropped

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def rows(self, step: int) -> list[int]:
        """This rank's row indices for global step `step` (0-based, counting across epochs)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = _epoch_order(self.num_rows, self.seed + epoch)
        start = index * self.batch_size + self.rank * self.local_batch_size
        return order[start : start + self.local_batch_size].tolist()


@functools.lru_cache(maxsize=2)
def _epoch_order(num_rows: int, seed: int) -> torch.Tensor:
    """One epoch's row order; cached, since every step of the epoch slices the same one."""
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))


def collate(tokenised: TokenisedPairs, rows: list[int], tokenizer: PreTrainedTokenizerBase) -> dict:
    """Pad the chosen rows into model inputs: b queries, b * (1 + n) docs grouped by query."""
    records = tokenised.table[rows]
    queries = tokenizer.pad({"input_ids": records["query_ids"]}, return_tensors="pt")
    docs = tokenizer.pad({"input_ids": [ids for group in records["doc_ids"] for ids in group]}, return_tensors="pt")
    return {
        "queries": {"input_ids": queries["input_ids"], "attention_mask": queries["attention_mask"]},
        "docs": {"input_ids": docs["input_ids"], "attention_mask": docs["attention_mask"]},
        "query_hashes": torch.tensor(records["query_hash"], dtype=torch.int64),
        "doc_hashes": torch.tensor(records["doc_hash"], dtype=torch.int64),
    }


class StepBatches(torch.utils.data.Dataset):
    """This rank's collated batch for each step from first_step to total_steps - 1, so that a
    DataLoader can prepare them in worker processes (data.num_workers)."""

    def __init__(
        self,
        tokenised: TokenisedPairs,
        batches: GlobalBatches,
        tokenizer: PreTrainedTokenizerBase,
        first_step: int,
        total_steps: int,
    ) -> None:
        self.tokenised, self.batches, self.tokenizer = tokenised, batches, tokenizer
        self.first_step, self.total_steps = first_step, total_steps

    def __len__(self) -> int:
        return max(self.total_steps - self.first_step, 0)

    def __getitem__(self, index: int) -> dict:
        return collate(self.tokenised, self.batches.rows(self.first_step + index), self.tokenizer)
