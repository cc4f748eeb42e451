"""Where the gathered matrix puts things, and what the gather's gradient is, checked with inputs
whose every row says who it is: one-hot vectors, one position per (row, slot), so that a row out
of place is named, not just detected. Both go through the very functions the loss calls."""

from __future__ import annotations

import torch

from trainer.core import distributed, losses


def _codes(k: int, slots: int, rows_total: int, offset: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(queries (k, D), docs (k, slots, D), D): query of global row g is one-hot at g; slot c of
    row g is one-hot at rows_total + c * rows_total + g."""
    width = rows_total * (1 + slots)
    q = torch.zeros(k, width, device=device)
    docs = torch.zeros(k, slots, width, device=device)
    for i in range(k):
        g = offset + i
        q[i, g] = 1.0
        for c in range(slots):
            docs[i, c, rows_total + c * rows_total + g] = 1.0
    return q, docs, width


def layout_problems(k: int, slots: int, gather: bool, mask_duplicates: bool, device) -> list[str]:
    """What is out of place in this rank's view of the global batch, in words (empty: nothing)."""
    world, rank = distributed.world_size(), distributed.rank()
    gathered = gather and world > 1
    rows_total, offset = (world * k, rank * k) if gathered else (k, 0)
    q, docs, _ = _codes(k, slots, rows_total, offset, device)
    ids = torch.arange(offset, offset + k, device=device)
    query_hashes = ids.to(torch.int64)
    doc_hashes = (ids[:, None] + rows_total * (1 + torch.arange(slots, device=device))[None, :]).to(torch.int64)
    batch = losses.gather_global_batch(q, docs, query_hashes, doc_hashes, gather, mask_duplicates)
    problems = []
    if not torch.equal(batch.rows.cpu(), ids.cpu()):
        problems.append(f"its rows sit at global rows {batch.rows.tolist()}, where the loss's targets expect {ids.tolist()}")
    held = batch.all_queries.argmax(dim=1).cpu()
    wrong = torch.nonzero(held != torch.arange(rows_total)).flatten()
    if len(wrong):
        j = int(wrong[0])
        problems.append(f"the gathered queries are out of order: position {j} holds row {int(held[j])}'s query")
    held = batch.doc_columns.argmax(dim=1).cpu() - rows_total
    wrong = torch.nonzero(held != torch.arange(slots * rows_total)).flatten()
    if len(wrong):
        j = int(wrong[0])
        (c, g), (hc, hg) = divmod(j, rows_total), divmod(int(held[j]), rows_total)
        kind = "hard-negative" if c or hc else "document"
        problems.append(f"the gathered {kind} columns are out of order: column {j} (row {g}'s slot {c}) holds "
                        f"row {hg}'s slot {hc}")
    if mask_duplicates and batch.doc_col_hash is not None:
        expected = torch.arange(rows_total, rows_total * (1 + slots))
        if not torch.equal(batch.doc_col_hash.cpu(), expected):
            problems.append("the gathered document hashes do not line up with their columns (duplicate masking "
                            "would mask the wrong texts)")
    return problems


def gather_gradient_factor(k: int, width: int, device) -> float:
    """The gradient the gather hands back to this rank's rows, as a multiple of the upstream
    gradient of those rows on one rank. The loss needs the sum over ranks: world size x."""
    x = torch.ones(k, width, device=device, requires_grad=True)
    y = distributed.gather_with_grad(x)
    upstream = torch.arange(1, y.numel() + 1, device=device, dtype=torch.float32).view_as(y) / y.numel()
    (y * upstream).sum().backward()
    rank = distributed.rank()
    own = upstream[rank * k : (rank + 1) * k]
    return float((x.grad / own).mean())
