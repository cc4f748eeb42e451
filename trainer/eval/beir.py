"""A BEIR-layout evaluation set (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), read and checked:
one clear error naming the file, line and field for anything malformed."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from trainer.data import DataError, jsonl_records


@dataclass
class BeirSet:
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance grade}


def load_beir(folder: str | Path, split: str = "test") -> BeirSet:
    """corpus.jsonl ({_id, title, text}), queries.jsonl ({_id, text}), qrels/<split>.tsv."""
    folder = Path(folder)
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / name).exists():
            raise DataError(f"{folder / name}: no such file (expected a BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    corpus = read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    queries = read_jsonl(folder / "queries.jsonl", ("_id", "text"))
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / f"{split}.tsv", newline="") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if number == 1 and row and row[0] == "query-id":
                continue
            if len(row) != 3 or not row[2].lstrip("-").isdigit():
                raise DataError(f"{folder / 'qrels' / f'{split}.tsv'}: line {number}: expected query-id, corpus-id, integer score")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    query_set = {q["_id"] for q in queries}
    return BeirSet(
        corpus_ids=[d["_id"] for d in corpus],
        corpus_texts=[corpus_text(d) for d in corpus],
        query_ids=[q["_id"] for q in queries if q["_id"] in qrels],
        query_texts=[q["text"] for q in queries if q["_id"] in qrels],
        qrels={q: rel for q, rel in qrels.items() if q in query_set},
    )


def corpus_text(record: dict) -> str:
    """A BEIR corpus record's text as it is embedded: the title (if any) before the text."""
    title = record.get("title") or ""
    return f"{title} {record['text']}".strip() if isinstance(title, str) else record["text"]


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    """The records of a small .jsonl file, each checked to have the required text fields."""
    rows = []
    for where, row in jsonl_records(path):
        for field in required:
            if not isinstance(row.get(field), str):
                raise DataError(f"{path}: {where}: field '{field}' is missing or not a string")
        rows.append(row)
    return rows
