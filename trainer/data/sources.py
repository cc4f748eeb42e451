"""Training sources: what `data.train` names, and reading a file as validated Arrow batches.

`data.train` is one path, a list of paths (one source made of several files, e.g. shards), or a
mapping `name -> path | {path, weight}` (several sources, sampled by weight). Files are read by
pyarrow's streaming readers, so memory stays bounded by one block whatever the file's size, and
every block is checked with vectorised Arrow compute rather than row by row in Python. Only when
a JSONL block fails is the file read again row by row (records.py), to name the exact line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.data.records import (
    FLAG_SCORES,
    Columns,
    DataError,
    first_bad_jsonl_row,
    jsonl_records,
    row_scores,
)

JSONL_BLOCK_BYTES = 8 << 20  # ~20K Debian rows: enough to keep the tokenizer's threads busy
ROWS_PER_BATCH = 16384


@dataclass(frozen=True)
class Source:
    """One training source: a name (for sampling and per-source metrics), its files, a weight."""

    name: str
    paths: tuple[str, ...]
    weight: float = 1.0


def parse_sources(spec) -> list[Source]:
    """data.train as given (str, list or mapping, plain or OmegaConf) -> the list of sources."""
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Mapping):
        if not spec:
            raise DataError("data.train is empty: give at least one file, folder or dataset name")
        return [_named_source(str(name), value) for name, value in spec.items()]
    if isinstance(spec, Sequence) and all(isinstance(p, str) for p in spec):
        if not spec:
            raise DataError("data.train is empty: give at least one file, folder or dataset name")
        paths = tuple(os.path.expanduser(p) for p in spec)
        return [Source(_stem(paths[0]), paths)]
    raise DataError(f"data.train must be a path, a list of paths or a mapping name -> {{path, weight}}; got {spec!r}")


def _named_source(name: str, value) -> Source:
    weight = 1.0
    if isinstance(value, Mapping):
        unknown = set(value) - {"path", "weight"}
        if unknown or "path" not in value:
            raise DataError(f"data.train.{name}: expected a path or {{path, weight}}, got keys {sorted(value)}")
        weight, value = value.get("weight", 1.0), value["path"]
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise DataError(f"data.train.{name}.weight must be a positive number, got {weight!r}")
    paths = parse_sources(value)[0].paths  # a path or a list of paths
    return Source(name, paths, float(weight))


def _stem(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv"):
        name = name.removesuffix(suffix)
    return name or "train"


# ------------------------------------------------------------------------------------ reading


def file_kind(path: str) -> str:
    """jsonl, parquet, csv, saved (a datasets save_to_disk folder) or hub; DataError otherwise."""
    p = Path(path)
    if p.is_dir():
        return "saved"
    suffix = "".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix
    kinds = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
    if suffix in kinds:
        if not p.exists():
            raise DataError(f"{path}: no such file")
        return kinds[suffix]
    if p.suffix or path.startswith((".", "/", "~")) or p.exists():
        raise DataError(f"{path}: not a supported training file (.jsonl, .jsonl.gz, .parquet, .csv) or folder")
    return "hub"


def text_batches(path: str, columns: Columns) -> Iterator[pa.Table]:
    """The file's rows as tables of `query` (string), `positive` (string) and `negatives`
    (list<string>, possibly empty per row), every text checked present and non-blank."""
    kind = file_kind(path)
    first_row = 0
    try:
        for batch in _raw_batches(path, kind, columns):
            yield _validated(batch, columns, path, kind, first_row)
            first_row += batch.num_rows
    except pa.ArrowInvalid as err:
        if kind == "jsonl":  # a malformed line or a value of the wrong type: find and name it
            first_bad_jsonl_row(Path(path), columns)
        raise DataError(f"{path}: could not be read: {err}") from None


def raw_rows(path: str, columns: Columns) -> Iterator[dict]:
    """The file's rows with every field, as Python dicts, in file order (e.g. to write them out
    again with something added). Read after text_batches has validated the file."""
    kind = file_kind(path)
    if kind == "jsonl":
        for _, record in jsonl_records(Path(path)):
            yield record
        return
    for batch in _raw_batches(path, kind, columns):
        yield from batch.to_pylist()


def _raw_batches(path: str, kind: str, columns: Columns) -> Iterator[pa.RecordBatch | pa.Table]:
    if kind == "jsonl":
        import pyarrow.json as pj

        stream = pa.input_stream(path, compression="gzip" if path.endswith(".gz") else None)
        schema = pa.schema(
            [(columns.query, pa.string()), (columns.positive, pa.string()), (columns.negatives, pa.list_(pa.string()))]
            + [(name, pa.string()) for name in _jsonl_prefix_columns(path, columns)]
            + [(name, pa.list_(pa.float64())) for name in (columns.scores, *FLAG_SCORES)]
        )
        reader = pj.open_json(
            stream,
            read_options=pj.ReadOptions(block_size=JSONL_BLOCK_BYTES),
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
        yield from reader
    elif kind == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_BATCH)
    elif kind == "csv":
        import pyarrow.csv as pv

        # Every column read as text: a CSV has no types, and an empty cell is a missing value.
        header = pv.open_csv(path).schema.names
        convert = pv.ConvertOptions(column_types={n: pa.string() for n in header}, strings_can_be_null=True)
        yield from pv.open_csv(path, convert_options=convert)
    else:
        import datasets

        if kind == "saved":
            table = datasets.load_from_disk(path)
        else:
            try:
                table = datasets.load_dataset(path, split="train")
            except Exception as err:  # the hub client raises many kinds; the user needs the name and the cause
                raise DataError(f"{path}: not a local path, and loading it as a hub dataset failed: {err}") from None
        yield from table.data.to_batches(max_chunksize=ROWS_PER_BATCH)


def _jsonl_prefix_columns(path: str, columns: Columns, sample_lines: int = 1000) -> list[str]:
    """negative_1..negative_k as the file's first lines name them (a JSON reader needs a schema
    before it starts; later rows with more such columns keep the first k)."""
    import gzip
    import json

    opener = gzip.open if path.endswith(".gz") else open
    names: set[str] = set()
    with opener(path, "rt", encoding="utf-8") as lines:
        for _, line in zip(range(sample_lines), lines):
            try:
                names.update(k for k in json.loads(line) if k.startswith(columns.negative_prefix))
            except (json.JSONDecodeError, TypeError, AttributeError):
                continue  # the reader itself will report this line
    k = 0
    while f"{columns.negative_prefix}{k + 1}" in names:
        k += 1
    return [f"{columns.negative_prefix}{i}" for i in range(1, k + 1)]


# --------------------------------------------------------------------------------- validation


def _where(kind: str, row: int) -> str:
    return f"line {row + 2}" if kind == "csv" else f"row {row}"  # csv: line 1 is the header


def _validated(batch, columns: Columns, path: str, kind: str, first_row: int) -> pa.Table:
    def fail(row: int, message: str):
        if kind == "jsonl":  # the row index of a JSONL table is not its line (blank lines): ask the row reader
            first_bad_jsonl_row(Path(path), columns)
        raise DataError(f"{path}: {_where(kind, first_row + row)}: {message}")

    names = batch.schema.names
    for field in (columns.query, columns.positive):
        if field not in names:
            fail(0, f"field '{field}' is missing")
    query = _checked_text(batch.column(columns.query), columns.query, fail)
    positive = _checked_text(batch.column(columns.positive), columns.positive, fail)
    negatives = _negatives(batch, names, columns, fail)
    scores = _scores(batch, names, columns, 1 + np.diff(negatives.offsets.to_numpy()), fail, path, kind, first_row)
    return pa.table({"query": query, "positive": positive, "negatives": negatives, "scores": scores})


def _scores(batch, names: list[str], columns: Columns, documents: np.ndarray, fail, path, kind, first_row) -> pa.Array:
    """One list<float32> per row: its teacher scores, aligned with [positive] + negatives, or an
    empty list for a row without scores."""
    rows = batch.num_rows

    def present(name: str) -> bool:  # a JSONL block has every schema column, null where absent
        return name in names and batch.column(name).null_count < rows

    if not present(columns.scores):
        if not any(present(name) for name in FLAG_SCORES):
            return pa.array([[]] * rows, pa.list_(pa.float32()))
        return _flag_scores(batch, names, columns, documents, path, kind, first_row)
    column = batch.column(columns.scores)
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    numeric = pa.types.is_list(column.type) and (pa.types.is_floating(column.type.value_type) or pa.types.is_integer(column.type.value_type))
    if not numeric and column.null_count < rows:
        valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
        fail(int(valid[0]), f"field '{columns.scores}' must be a list of numbers, got {column.type}")
    if not numeric:
        return pa.array([[]] * rows, pa.list_(pa.float32()))
    column = pc.fill_null(column, pa.scalar([], column.type))
    offsets = column.offsets.to_numpy()
    counts = np.diff(offsets)
    wrong = np.flatnonzero((counts > 0) & (counts != documents))
    if len(wrong):
        row = int(wrong[0])
        fail(row, f"field '{columns.scores}' has {counts[row]} scores for {documents[row]} texts "
                  "(one per text: the positive, then each hard negative)")
    values = column.flatten().cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        owner = int(np.searchsorted(offsets, offsets[0] + bad[0], side="right") - 1)
        fail(owner, f"field '{columns.scores}[{bad[0] - (offsets[owner] - offsets[0])}]' must be a finite number, got {values[bad[0]]}")
    return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)), pa.array(values.astype(np.float32)))


def _flag_scores(batch, names, columns: Columns, documents: np.ndarray, path, kind, first_row) -> pa.Array:
    """FlagEmbedding's pos_scores / neg_scores (a rare layout: read row by row)."""
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    pos = table.column(FLAG_SCORES[0]).to_pylist() if FLAG_SCORES[0] in names else [None] * table.num_rows
    neg = table.column(FLAG_SCORES[1]).to_pylist() if FLAG_SCORES[1] in names else [None] * table.num_rows
    out = []
    for row, (p, n) in enumerate(zip(pos, neg)):
        record = {FLAG_SCORES[0]: p, FLAG_SCORES[1]: n}
        try:
            out.append(row_scores(path, _where(kind, first_row + row), record, columns, int(documents[row])) or [])
        except DataError:
            if kind == "jsonl":
                first_bad_jsonl_row(Path(path), columns)
            raise
    return pa.array(out, pa.list_(pa.float32()))


def _checked_text(array, field: str, fail) -> pa.Array:
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        valid = np.flatnonzero(array.is_valid().to_numpy(zero_copy_only=False))
        fail(int(valid[0]) if len(valid) else 0, f"field '{field}' must be a string, got {array.type}")
    missing = np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))
    blank = np.flatnonzero(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(array), ""), False).to_numpy(zero_copy_only=False))
    if len(missing) and (not len(blank) or missing[0] < blank[0]):
        fail(int(missing[0]), f"field '{field}' is missing")
    if len(blank):
        fail(int(blank[0]), f"field '{field}' is empty")
    return array.cast(pa.string())


def _negatives(batch, names: list[str], columns: Columns, fail) -> pa.Array:
    """One list<string> per row: the list column's texts, then negative_1..negative_k's (a row's
    prefixed negatives end at its first missing one), as the row reader has always read them."""
    rows = batch.num_rows
    parts = []  # (texts per row, the texts in row-major order)
    if columns.negatives in names:
        column = batch.column(columns.negatives)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
            if len(valid):
                fail(int(valid[0]), f"field '{columns.negatives}' must be a list of strings, got {column.type}")
        else:
            column = pc.fill_null(column, pa.scalar([], column.type))
            offsets = column.offsets.to_numpy()
            owner = np.repeat(np.arange(rows), np.diff(offsets))

            def fail_value(i: int, message: str):
                row = int(owner[i])
                fail(row, message.replace(f"'{columns.negatives}'", f"'{columns.negatives}[{i - (offsets[row] - offsets[0])}]'"))

            parts.append((np.diff(offsets), _checked_text(column.flatten(), columns.negatives, fail_value)))
    prefixed = []
    while f"{columns.negative_prefix}{len(prefixed) + 1}" in names:
        prefixed.append(batch.column(f"{columns.negative_prefix}{len(prefixed) + 1}"))
    if prefixed:
        present = np.stack([c.is_valid().to_numpy(zero_copy_only=False) for c in prefixed], axis=1)
        counts = np.where(present.all(axis=1), len(prefixed), np.argmin(present, axis=1))  # up to the first gap
        kept = [np.flatnonzero(counts > j) for j in range(len(prefixed))]
        texts = [
            _checked_text(c.take(pa.array(kept[j])), f"{columns.negative_prefix}{j + 1}",
                          lambda i, m, j=j: fail(int(kept[j][i]), m))
            for j, c in enumerate(prefixed)
        ]
        # Column-major (all negative_1, then all negative_2...) -> row-major.
        order = np.argsort(np.concatenate([rows_j * len(prefixed) + j for j, rows_j in enumerate(kept)]), kind="stable")
        parts.append((counts, pa.concat_arrays(texts).take(pa.array(order))))
    return _rows_of_parts(parts, rows)


def _rows_of_parts(parts: list[tuple[np.ndarray, pa.Array]], rows: int) -> pa.Array:
    """Concatenate, row by row, several (count per row, row-major texts) parts into list<string>."""
    if not parts:
        return pa.array([[]] * rows, pa.list_(pa.string()))
    counts = sum(c for c, _ in parts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    if len(parts) == 1:
        values = parts[0][1]
    else:  # each text's slot: its row's start, after the earlier parts' texts of that row
        slots, before = [], np.zeros(rows, dtype=np.int64)
        for c, _ in parts:
            owner = np.repeat(np.arange(rows), c)
            within = np.arange(len(owner)) - np.repeat(np.cumsum(c) - c, c)
            slots.append(offsets[owner] + before[owner] + within)
            before = before + c
        values = pa.concat_arrays([v for _, v in parts]).take(pa.array(np.argsort(np.concatenate(slots))))
    return pa.ListArray.from_arrays(pa.array(offsets), values.cast(pa.string()))
