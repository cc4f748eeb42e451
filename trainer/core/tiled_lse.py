"""A row-wise masked logsumexp of scaled cosines, streamed over column tiles: the loss's memory
stays linear in the batch (trainer/core/losses.py calls it for blocks too large to hold whole)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# (cosine tile (b, T), first column index) -> (masked (b, T), target (b, T) or None)
MaskFn = Callable[[Tensor, int], tuple[Tensor, Tensor | None]]


def hardest_negative(cos: Tensor, masked: Tensor, target: Tensor | None) -> Tensor:
    """Per row, the highest cosine among unmasked non-target columns (-inf if there is none)."""
    excluded = masked if target is None else masked | target
    return cos.masked_fill(excluded, float("-inf")).amax(dim=1)


class TiledLogSumExp(torch.autograd.Function):
    """Row-wise masked logsumexp of scale * anchors @ columns.T, streamed over column tiles.

    Forward keeps a running logsumexp per row; backward recomputes each tile's scores (and masks)
    and turns them into softmax weights with the saved logsumexp. Neither pass holds more than one
    (b, tile) block of scores: memory is linear in the batch.
    Also returns, without gradient, each row's hardest unmasked non-target cosine.
    """

    @staticmethod
    def forward(ctx, anchors: Tensor, columns: Tensor, scale: float, tile: int, mask_fn: MaskFn):
        b = anchors.shape[0]
        lse = anchors.new_full((b,), float("-inf"))
        hardest = anchors.new_full((b,), float("-inf"))
        for start in range(0, columns.shape[0], tile):
            cos = anchors @ columns[start : start + tile].T
            masked, target = mask_fn(cos, start)
            hardest = torch.maximum(hardest, hardest_negative(cos, masked, target))
            # In place from here on: each (b, tile) temporary is what the memory bound is made of.
            scores = cos.mul_(scale).masked_fill_(masked, float("-inf"))
            lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=1))
        ctx.save_for_backward(anchors, columns, lse)
        ctx.scale, ctx.tile, ctx.mask_fn = scale, tile, mask_fn
        ctx.mark_non_differentiable(hardest)
        return lse, hardest

    @staticmethod
    def backward(ctx, grad_lse: Tensor, _grad_hardest: Tensor):
        anchors, columns, lse = ctx.saved_tensors
        scale, tile = ctx.scale, ctx.tile
        # A row whose every column is masked has lse = -inf and contributes nothing; keep it
        # from turning into exp(-inf - -inf) = nan.
        finite = torch.isfinite(lse)
        safe_lse = torch.where(finite, lse, torch.zeros_like(lse))
        row_weight = torch.where(finite, grad_lse, torch.zeros_like(grad_lse))[:, None] * scale
        grad_anchors = torch.zeros_like(anchors)
        grad_columns = torch.empty_like(columns)
        for start in range(0, columns.shape[0], tile):
            tile_columns = columns[start : start + tile]
            cos = anchors @ tile_columns.T
            masked, _ = ctx.mask_fn(cos, start)
            # softmax weight * upstream gradient * scale = d loss / d cos, computed in place.
            weights = cos.mul_(scale).masked_fill_(masked, float("-inf")).sub_(safe_lse[:, None]).exp_().mul_(row_weight)
            grad_anchors += weights @ tile_columns
            grad_columns[start : start + tile] = weights.T @ anchors
        return grad_anchors, grad_columns, None, None, None
