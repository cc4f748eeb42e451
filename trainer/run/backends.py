"""How the trainer's model is wrapped, stepped, checkpointed and exported: plain DDP here,
DeepSpeed ZeRO in deepspeed_backend.py. The loop in loop.py talks only to this interface, so both
run the same data order, GradCache step, schedule and metrics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedTokenizerBase

from trainer.core import distributed
from trainer.core.export import save_sentence_transformer
from trainer.core.model import Encoder
from trainer.run import safe_load
from trainer.run.optimizer import StepResult, make_scheduler, trainable_parameters

__all__ = ["DDPBackend", "StepResult", "TrainingBackend", "create_backend"]


class TrainingBackend(Protocol):
    model: nn.Module
    """What GradCache drives: the DDP wrapper, the DeepSpeed engine, or the bare encoder."""
    grad_scaler: torch.amp.GradScaler | None
    """fp16's gradient scaler, which GradCache applies to every backward (None otherwise)."""
    partitions_parameters: bool
    """True when no rank holds whole weights (ZeRO-3): every forward then needs every rank."""

    def lr(self) -> float:
        """The learning rate the next step will use."""

    def step(self, loss_is_finite: bool) -> StepResult:
        """Clip, step the optimizer and the schedule, clear gradients. Skips the update on every
        rank alike when loss_is_finite is False (agreed by the caller) or the gradient norm is not
        finite. GradCache turns a non-finite loss into non-finite gradients, so either way the
        decision rests on reduced, hence identical, figures."""

    def save_state(self, folder: Path) -> None:
        """Write model, optimizer, schedule (and scaler) state into folder (collective)."""

    def load_state(self, folder: Path) -> None:
        """Restore what save_state wrote (collective)."""

    def export(self, folder: Path, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> None:
        """Write the whole model as a sentence-transformers folder on rank 0 (collective)."""


def create_backend(name: str, encoder: Encoder, device: torch.device, cfg, total_steps: int, **deepspeed_kwargs) -> TrainingBackend:
    """name 'ddp' or 'deepspeed'; cfg is the run config (trainer.* and deepspeed.* are read)."""
    if name == "deepspeed":
        from trainer.run.deepspeed_backend import (
            DeepSpeedBackend,  # DeepSpeed is an optional dependency
        )

        return DeepSpeedBackend(encoder, device, cfg, total_steps, **deepspeed_kwargs)
    return DDPBackend(encoder, device, cfg, total_steps)


class DDPBackend:
    """DistributedDataParallel (or nothing, for one process), torch AdamW, a transformers schedule;
    rank 0 writes the replicated state."""

    partitions_parameters = False

    def __init__(self, encoder: Encoder, device: torch.device, cfg, total_steps: int) -> None:
        self.encoder = encoder
        self.model = encoder
        if distributed.world_size() > 1:
            # No buffer broadcast before every forward: a text encoder's buffers (position ids) are
            # constants, the same on every rank, and the broadcast would make each GradCache chunk's
            # forward a collective, which a rank could not leave alone when it runs out of memory.
            self.model = DistributedDataParallel(
                encoder, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        self.optimizer = torch.optim.AdamW(
            trainable_parameters(encoder), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, fused=device.type == "cuda"
        )
        self.scheduler = make_scheduler(self.optimizer, cfg.trainer.schedule.value, cfg.trainer.warmup_steps, total_steps)
        self.grad_scaler = torch.amp.GradScaler(device.type) if cfg.trainer.precision.value == "fp16" else None
        self.max_grad_norm = cfg.trainer.max_grad_norm or math.inf

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, loss_is_finite: bool) -> StepResult:
        if not loss_is_finite:
            # Before unscale_: the fp16 scale stays as it is, since this was no overflow.
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(grad_norm=math.nan, applied=False)
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), self.max_grad_norm)
        # DDP's reduction makes the norm identical on every rank; agree anyway, in case a rank's
        # gradients went bad after it (the check is one scalar).
        finite = not distributed.any_rank(not bool(torch.isfinite(grad_norm)))
        if self.grad_scaler is not None:
            if not finite:  # what the scaler finds on its own; make sure every rank finds it
                next(p.grad for p in self.encoder.parameters() if p.grad is not None).fill_(math.inf)
            scale = self.grad_scaler.get_scale()
            self.grad_scaler.step(self.optimizer)  # skips the update itself on inf/nan gradients
            self.grad_scaler.update()
            applied = self.grad_scaler.get_scale() >= scale
            result = StepResult(float(grad_norm), applied=applied, overflow=not applied)
        else:
            if finite:
                self.optimizer.step()
            result = StepResult(float(grad_norm), applied=finite)
        if result.applied:  # a skipped update does not advance the schedule either (as in DeepSpeed)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def save_state(self, folder: Path) -> None:
        if not distributed.is_main():  # the state is the same on every rank
            return
        torch.save(self.encoder.state_dict(), folder / "model.pt")
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
        if self.grad_scaler is not None:
            torch.save(self.grad_scaler.state_dict(), folder / "scaler.pt")

    def load_state(self, folder: Path) -> None:
        if not (folder / "model.pt").exists():
            raise ValueError(f"{folder} holds no DDP checkpoint (model.pt); was it written with trainer.backend=deepspeed?")
        self.encoder.load_state_dict(safe_load.load(folder / "model.pt"))
        self.optimizer.load_state_dict(safe_load.load(folder / "optimizer.pt"))
        self.scheduler.load_state_dict(safe_load.load(folder / "scheduler.pt"))
        if self.grad_scaler is not None and (folder / "scaler.pt").exists():
            self.grad_scaler.load_state_dict(safe_load.load(folder / "scaler.pt"))

    def export(self, folder: Path, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> None:
        if distributed.is_main():
            save_sentence_transformer(self.encoder, tokenizer, folder, max_seq_length=max_seq_length)
