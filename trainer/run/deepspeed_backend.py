"""The DeepSpeed ZeRO backend (stages 1, 2, 3, optional CPU offload of the optimizer).

GradCache drives the engine itself (gradcache.py): pass 1 runs on engine.module without grad,
pass 2 runs every chunk's forward through the engine and engine.backward() inside
engine.coalesce_grad_reduction(), so ZeRO reduces (1: all-reduce, 2/3: reduce-scatter) once per
optimizer step instead of once per chunk, and engine.step() runs once. The gradient-accumulation
boundary toggled by hand is not enough for this: ZeRO 2 and 3 reduce on every backward.

Checkpoints are DeepSpeed's own (each rank writes its shard of the optimizer state, and under
ZeRO-3 of the weights) inside our step-N folder, so they stay atomic with the rest of it. The final
model is gathered whole: under ZeRO-3 layer by layer onto rank 0's CPU.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from trainer.core import distributed
from trainer.core.export import save_sentence_transformer
from trainer.core.model import Encoder
from trainer.run import safe_load
from trainer.run.deepspeed_config import offloads_optimizer
from trainer.run.optimizer import StepResult, make_scheduler, trainable_parameters

CHECKPOINT_TAG = "deepspeed"
"""The folder inside checkpoints/step-N that holds DeepSpeed's files."""


class DeepSpeedBackend:
    grad_scaler = None  # fp16 is refused in deepspeed_config.build_config

    def __init__(self, encoder: Encoder, device: torch.device, cfg, total_steps: int, *, config: dict) -> None:
        if not hasattr(deepspeed.DeepSpeedEngine, "coalesce_grad_reduction"):
            raise RuntimeError(
                f"DeepSpeed {deepspeed.__version__} lacks engine.coalesce_grad_reduction (added in 0.19.2), "
                "which GradCache needs for one gradient reduction per step: pip install 'deepspeed>=0.19.2'"
            )
        _ensure_process_group(device)
        if offloads_optimizer(config):
            from deepspeed.ops.adam import (
                DeepSpeedCPUAdam,  # steps the CPU-held state in place
            )

            optimizer = DeepSpeedCPUAdam(
                trainable_parameters(encoder), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, adamw_mode=True
            )
        else:
            optimizer = torch.optim.AdamW(trainable_parameters(encoder), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)
        self.encoder = encoder
        # The schedule is built on the optimizer DeepSpeed hands back after wrapping it, so that its
        # learning rate reaches the parameter groups ZeRO actually steps.
        self.model, _, _, self.scheduler = deepspeed.initialize(
            model=encoder,
            optimizer=optimizer,
            lr_scheduler=lambda opt: make_scheduler(opt, cfg.trainer.schedule.value, cfg.trainer.warmup_steps, total_steps),
            config=config,
            dist_init_required=False,
        )
        self.partitions_parameters = self.model.zero_optimization_stage() == 3

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, loss_is_finite: bool) -> StepResult:
        # Clips (gradient_clipping), steps optimizer and schedule, clears gradients. With fp32
        # master weights (the only kind build_config allows) ZeRO skips the update, and the
        # schedule, on its own when the global gradient norm is not finite, on every rank alike;
        # GradCache makes a non-finite loss give such gradients. So DeepSpeed decides, once.
        self.model.step()
        if not self.model.was_step_applied():
            return StepResult(grad_norm=math.nan, applied=False)
        norm = self.model.get_global_grad_norm()
        return StepResult(float(norm) if norm is not None else math.nan, applied=True)

    def save_state(self, folder: Path) -> None:
        self.model.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False)

    def load_state(self, folder: Path) -> None:
        if not (folder / CHECKPOINT_TAG).is_dir():
            raise ValueError(f"{folder} holds no DeepSpeed checkpoint ({CHECKPOINT_TAG}/); was it written with trainer.backend=ddp?")
        # DeepSpeed's checkpoint engine asks torch.load for weights_only=False: overrule it.
        with safe_load.weights_only_everywhere(folder / CHECKPOINT_TAG, safe_load.deepspeed_globals()):
            path, _ = self.model.load_checkpoint(
                str(folder), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {folder / CHECKPOINT_TAG}")

    def export(self, folder: Path, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> None:
        backbone_state = None
        if self.partitions_parameters:
            # Every rank takes part; rank 0 receives the whole state dict, one layer at a time.
            state = self.model._zero3_consolidated_16bit_state_dict()
            if state is not None:
                backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        if distributed.is_main():
            save_sentence_transformer(self.encoder, tokenizer, folder, max_seq_length, backbone_state=backbone_state)


def _ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process; torchrun/Slurm runs have one already."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
