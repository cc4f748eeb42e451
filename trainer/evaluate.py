"""Retrieval evaluation on a BEIR-layout folder: exact search by a matrix product, then
NDCG@10, recall@10 and MRR@10 over the queries that have relevance judgements."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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
            raise DataError(f"{folder / name}: no such file (eval.data must be a BEIR-layout folder)")
    corpus = _read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    queries = _read_jsonl(folder / "queries.jsonl", ("_id", "text"))
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
        corpus_texts=[(d.get("title", "") + " " + d["text"]).strip() for d in corpus],
        query_ids=[q["_id"] for q in queries if q["_id"] in qrels],
        query_texts=[q["text"] for q in queries if q["_id"] in qrels],
        qrels={q: rel for q, rel in qrels.items() if q in query_set},
    )


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    for where, row in jsonl_records(path):
        for field in required:
            if not isinstance(row.get(field), str):
                raise DataError(f"{path}: {where}: field '{field}' is missing or not a string")
        rows.append(row)
    return rows


def retrieval_metrics(scores: torch.Tensor, data: BeirSet, k: int = 10) -> dict[str, float]:
    """scores: (queries, corpus). Mean NDCG@k (graded), recall@k and MRR@k over the queries."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()
    ndcg = recall = mrr = 0.0
    for row, query_id in enumerate(data.query_ids):
        relevant = {doc: grade for doc, grade in data.qrels[query_id].items() if grade > 0}
        ranked = [data.corpus_ids[i] for i in top[row]]
        dcg = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked))
        ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(relevant.values(), reverse=True)[:k]))
        ndcg += dcg / ideal if ideal else 0.0
        recall += sum(doc in relevant for doc in ranked) / len(relevant) if relevant else 0.0
        mrr += next((1.0 / (rank + 1) for rank, doc in enumerate(ranked) if doc in relevant), 0.0)
    n = max(len(data.query_ids), 1)
    return {f"ndcg@{k}": ndcg / n, f"recall@{k}": recall / n, f"mrr@{k}": mrr / n}


@torch.no_grad()
def embed_texts(embed_batch: Callable[[list[str]], torch.Tensor], texts: list[str], batch_size: int) -> torch.Tensor:
    """Normalised embeddings of texts, batched longest-first so padding is small."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        vectors = F.normalize(embed_batch([texts[i] for i in index]).float(), dim=-1).cpu()
        for i, vector in zip(index, vectors):
            out[i] = vector
    return torch.stack(out)


def evaluate(
    embed_queries: Callable[[list[str]], torch.Tensor],
    embed_docs: Callable[[list[str]], torch.Tensor],
    data: BeirSet,
    batch_size: int = 128,
) -> dict[str, float]:
    queries = embed_texts(embed_queries, data.query_texts, batch_size)
    corpus = embed_texts(embed_docs, data.corpus_texts, batch_size)
    return retrieval_metrics(queries @ corpus.T, data)
