"""The global batch as one rank sees it: its own rows, every rank's columns, gathered with gradients.
The layout the loss's masks and targets rely on is set here, and only here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.core import distributed


@dataclass(frozen=True)
class GlobalBatch:
    """One rank's view of the global batch: its own rows, everyone's columns (all normalised)."""

    def truncated(self, dim: int) -> GlobalBatch:
        """The same batch on the first dim coordinates of the embeddings, normalised again.
        (Truncating a normalised vector and normalising it equals doing so to the raw one.)"""
        queries = F.normalize(self.queries[:, :dim], dim=-1)
        positives = F.normalize(self.positives[:, :dim], dim=-1)
        return dataclasses.replace(
            self,
            queries=queries,
            positives=positives,
            all_queries=F.normalize(self.all_queries[:, :dim], dim=-1),
            doc_columns=F.normalize(self.doc_columns[:, :dim], dim=-1),
            pos_cos=(queries * positives).sum(-1),
        )

    queries: Tensor  # (b, d) local rows
    positives: Tensor  # (b, d) local rows
    all_queries: Tensor  # (N, d)
    doc_columns: Tensor  # (C * N, d), column k = c * N + g
    rows: Tensor  # (b,) global row index g of each local row
    pos_cos: Tensor  # (b,) cosine of each local query to its positive
    # Text hashes, present only when duplicate masking is on.
    query_hash: Tensor | None = None  # (b,)
    pos_hash: Tensor | None = None  # (b,)
    all_query_hash: Tensor | None = None  # (N,)
    all_pos_hash: Tensor | None = None  # (N,)
    doc_col_hash: Tensor | None = None  # (C * N,)

    @property
    def num_rows(self) -> int:  # N, the global batch size
        return self.all_queries.shape[0]


def gather_global_batch(q: Tensor, docs: Tensor, query_hashes: Tensor | None, doc_hashes: Tensor | None,
                        gather: bool = True, mask_duplicates: bool = False) -> GlobalBatch:
    """This rank's view of the global batch: q (b, d) and docs (b, 1 + n, d) normalised in fp32 (or
    wider), every rank's gathered with gradients when gather is on and there are several ranks.
    Local row i of rank r is global row g = r * b + i; document column k = c * N + g (slot c)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q = F.normalize(q.to(dtype), dim=-1)
    docs = F.normalize(docs.to(dtype), dim=-1)
    b = q.shape[0]
    use_gather = gather and distributed.world_size() > 1
    all_q = distributed.gather_with_grad(q) if use_gather else q
    all_docs = distributed.gather_with_grad(docs) if use_gather else docs  # (N, C, d)
    offset = distributed.rank() * b if use_gather else 0
    hashes = {}
    if mask_duplicates:
        gather = distributed.gather_no_grad if use_gather else (lambda t: t)
        all_qh = gather(query_hashes.to(q.device, torch.int64))
        all_dh = gather(doc_hashes.to(q.device, torch.int64))  # (N, C)
        hashes = dict(
            query_hash=query_hashes.to(q.device, torch.int64),
            pos_hash=doc_hashes[:, 0].to(q.device, torch.int64),
            all_query_hash=all_qh,
            all_pos_hash=all_dh[:, 0],
            doc_col_hash=all_dh.t().reshape(-1),
        )
    return GlobalBatch(
        queries=q,
        positives=docs[:, 0],
        all_queries=all_q,
        doc_columns=all_docs.transpose(0, 1).reshape(-1, q.shape[1]),
        rows=torch.arange(offset, offset + b, device=q.device),
        pos_cos=(q * docs[:, 0]).sum(-1),
        **hashes,
    )
