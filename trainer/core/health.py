"""Training-health figures of a batch's embeddings: does the encoder collapse, do positives align,
do the texts spread over the sphere (Wang & Isola 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_std(embeddings: torch.Tensor) -> float:
    """Mean over dimensions of the std across rows of the normalised embeddings. It falls toward 0
    when the encoder collapses (every text mapped to nearly the same point)."""
    return F.normalize(embeddings.float(), dim=-1).std(dim=0).mean().item()


def alignment(queries: torch.Tensor, positives: torch.Tensor) -> float:
    """Wang & Isola's alignment: mean squared distance of positive pairs (lower is better)."""
    return (F.normalize(queries.float(), dim=-1) - F.normalize(positives.float(), dim=-1)).pow(2).sum(-1).mean().item()


def uniformity(embeddings: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola's uniformity: log mean exp(-t * squared distance) over distinct pairs
    (lower = spread more evenly over the sphere)."""
    x = F.normalize(embeddings.float(), dim=-1)
    return torch.pdist(x).pow(2).mul(-t).exp().mean().log().item()
