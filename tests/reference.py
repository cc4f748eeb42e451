"""An independent, deliberately naive float64 implementation of the loss family.

It follows DESIGN.md's definitions literally, one row and one candidate at a time, with Python
loops and no tensor tricks, so that it shares no code (and no clever indexing) with
trainer/core/losses.py. It works on the whole global batch at once: rows = all N pairs.
"""

from __future__ import annotations

import math

import torch


def reference_loss(
    q: torch.Tensor,
    docs: torch.Tensor,
    temperature: float,
    directions: tuple[str, ...],
    partition: str,
    query_hashes: list[int] | None = None,
    doc_hashes: list[list[int]] | None = None,
    margin: float | None = None,
) -> float:
    q = torch.nn.functional.normalize(q.double(), dim=-1)
    docs = torch.nn.functional.normalize(docs.double(), dim=-1)
    n_rows, n_slots, _ = docs.shape

    def cos(a, b):
        return float(a @ b)

    total = 0.0
    for g in range(n_rows):
        pos_cos = cos(q[g], docs[g, 0])

        def keep(similarity, is_target, duplicate):
            if is_target:
                return True
            if duplicate:
                return False
            return margin is None or similarity <= pos_cos + margin

        blocks = {}
        # query_to_doc: every doc column; the positive (slot 0 of row g) is the target.
        blocks["query_to_doc"] = [
            cos(q[g], docs[j, c])
            for c in range(n_slots)
            for j in range(n_rows)
            if keep(
                cos(q[g], docs[j, c]),
                is_target=(j == g and c == 0),
                duplicate=doc_hashes is not None and doc_hashes[j][c] == doc_hashes[g][0],
            )
        ]
        if "query_to_query" in directions:
            blocks["query_to_query"] = [
                cos(q[g], q[j])
                for j in range(n_rows)
                if j != g
                and keep(
                    cos(q[g], q[j]),
                    is_target=False,
                    duplicate=query_hashes is not None
                    and (query_hashes[j] == query_hashes[g] or doc_hashes[j][0] == doc_hashes[g][0]),
                )
            ]
        if "doc_to_query" in directions:
            blocks["doc_to_query"] = [
                cos(docs[g, 0], q[j])
                for j in range(n_rows)
                if keep(
                    cos(docs[g, 0], q[j]),
                    is_target=(j == g),
                    duplicate=query_hashes is not None
                    and (query_hashes[j] == query_hashes[g] or doc_hashes[j][0] == doc_hashes[g][0]),
                )
            ]
        if "doc_to_doc" in directions:
            blocks["doc_to_doc"] = [
                cos(docs[g, 0], docs[j, c])
                for c in range(n_slots)
                for j in range(n_rows)
                if j != g
                and keep(
                    cos(docs[g, 0], docs[j, c]),
                    is_target=False,
                    duplicate=doc_hashes is not None and doc_hashes[j][c] == doc_hashes[g][0],
                )
            ]

        def lse(values):
            values = [v / temperature for v in values]
            if not values:
                return -math.inf
            top = max(values)
            return top + math.log(sum(math.exp(v - top) for v in values))

        if partition == "joint":
            log_z = lse([v for block in blocks.values() for v in block])
        else:
            log_z = sum(lse(block) for block in blocks.values()) / len(blocks)
        total += log_z - pos_cos / temperature
    return total / n_rows
