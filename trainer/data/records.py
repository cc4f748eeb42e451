"""Rows as Python sees them: the error type, the column names, text hashes, and the exact row
validator that names file, line and field.

The training path validates whole Arrow batches at once (sources.py); this row-by-row reader is
what explains a problem once one is found, and what reads small files such as an eval set.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad training or evaluation data: the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class Columns:
    """Where the texts are (the data.* column settings)."""

    query: str = "query"
    positive: str = "positive"
    negatives: str = "negatives"
    negative_prefix: str = "negative_"
    scores: str = "scores"
    """Teacher scores aligned with [positive] + negatives (FlagEmbedding's pos_scores and
    neg_scores are read too, when this column is absent)."""


FLAG_SCORES = ("pos_scores", "neg_scores")  # FlagEmbedding's teacher-score columns


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


def row_texts(source: str, where: str, record: dict, columns: Columns) -> tuple[str, list[str]]:
    """(query, [positive, hard negatives...]) of one record; DataError naming source, where and field."""

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


def row_scores(source: str, where: str, record: dict, columns: Columns, documents: int) -> list[float] | None:
    """The row's teacher scores, aligned with its `documents` texts ([positive] + negatives), or
    None if it has none; DataError naming source, where and field when they are malformed."""
    if record.get(columns.scores) is not None:
        fields = [(columns.scores, record[columns.scores])]
    elif record.get(FLAG_SCORES[0]) is not None or record.get(FLAG_SCORES[1]) is not None:
        fields = [(name, record.get(name)) for name in FLAG_SCORES]
    else:
        return None
    scores = []
    for field, values in fields:
        if not isinstance(values, list):
            raise DataError(f"{source}: {where}: field '{field}' must be a list of numbers, got {type(values).__name__}")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
                raise DataError(f"{source}: {where}: field '{field}[{i}]' must be a finite number, got {value!r}")
        scores.append(values[:1] if field == FLAG_SCORES[0] else values)
    scores = [float(v) for part in scores for v in part]
    if len(scores) != documents:
        names = " + ".join(f"'{f}'" for f, _ in fields)
        raise DataError(
            f"{source}: {where}: field {names} has {len(scores)} scores for {documents} texts "
            "(one per text: the positive, then each hard negative)"
        )
    return scores


def first_bad_jsonl_row(path: Path, columns: Columns) -> None:
    """Read a JSONL file row by row and raise the DataError of its first bad row, if it has one."""
    for where, record in jsonl_records(path):
        _, docs = row_texts(str(path), where, record, columns)
        row_scores(str(path), where, record, columns, len(docs))
