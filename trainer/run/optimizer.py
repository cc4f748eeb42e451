"""What every backend's optimizer side shares: which parameters train, the learning-rate
schedule, and what a step reports. Its own module so that backends.py (which chooses a backend)
and deepspeed_backend.py both import it, and neither imports the other at module level."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_scheduler

_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass(frozen=True)
class StepResult:
    grad_norm: float
    """The gradient norm before clipping (nan when the step was refused before computing it)."""
    applied: bool
    """False when the weights, the optimizer state and the schedule were left as they were."""
    overflow: bool = False
    """Not applied because fp16's loss scale overflowed: the scaler's routine business (it lowers
    the scale), not a bad step."""


def trainable_parameters(encoder: nn.Module) -> list[nn.Parameter]:
    """What the optimizer steps: everything, or with LoRA the adapters alone (so that it holds
    their state only)."""
    return [p for p in encoder.parameters() if p.requires_grad]


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int):
    return get_scheduler(_SCHEDULES[schedule], optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
