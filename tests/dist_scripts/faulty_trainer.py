"""`python -m tests.dist_scripts.faulty_trainer [overrides]`: the trainer, with a fault injected
into the loss of chosen steps, to test what the trainer does about it. Set by environment variables:

  FAULT=nan_loss   the loss is NaN (and so are its gradients)
  FAULT=inf_grad   the loss is finite, its gradient infinite
  FAULT_STEPS=3,4  the optimizer steps (counted from 1 in this process) that get it
  FAULT_RANK=1     the rank that gets it (default: every rank)
"""

from __future__ import annotations

import math
import os

import torch

from trainer.core import distributed, gradcache


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


class FaultyLoss:
    """Wraps the step's loss function; every other attribute is the wrapped loss's."""

    def __init__(self, loss_fn, kind: str, steps: set[int], rank: int | None) -> None:
        self.loss_fn, self.kind, self.steps, self.rank, self.calls = loss_fn, kind, steps, rank, 0

    def __getattr__(self, name):
        return getattr(self.loss_fn, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        loss = self.loss_fn(*args, **kwargs)
        if self.calls not in self.steps or self.rank not in (None, distributed.rank()):
            return loss
        return loss * math.nan if self.kind == "nan_loss" else _InfiniteGradient.apply(loss)


def install() -> None:
    kind = os.environ["FAULT"]
    if kind not in ("nan_loss", "inf_grad"):
        raise SystemExit(f"FAULT must be nan_loss or inf_grad, got {kind!r}")
    steps = {int(s) for s in os.environ["FAULT_STEPS"].split(",")}
    rank = int(os.environ["FAULT_RANK"]) if os.environ.get("FAULT_RANK") else None
    init = gradcache.GradCache.__init__

    def faulty_init(self, encoder, loss_fn, *args, **kwargs):
        init(self, encoder, FaultyLoss(loss_fn, kind, steps, rank), *args, **kwargs)

    gradcache.GradCache.__init__ = faulty_init


if __name__ == "__main__":
    from trainer.__main__ import main

    install()
    main()
