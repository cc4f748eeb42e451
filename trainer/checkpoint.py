"""Step-N checkpoints that are either complete or absent.

A checkpoint is written to checkpoints/step-N.tmp and renamed to step-N only once every rank has
written its part, so a crash at any moment leaves the previous complete checkpoint as the latest.
Rank 0 writes the replicated state (model, optimizer, scheduler, scaler, trainer state); every
rank writes its own RNG states, since each rank draws its own dropout masks.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer import distributed

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer: where it is."""

    step: int  # optimizer steps completed
    wandb_id: str | None = None


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None



def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    run_dir: Path,
    state: TrainerState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    keep: int,
) -> Path:
    """Write checkpoints/step-<state.step> atomically (collective: every rank must call it)."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{state.step}"
    tmp = root / f"step-{state.step}.tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an attempt that crashed
        tmp.mkdir(parents=True)
    distributed.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.is_main():
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state.__dict__))
        if final.exists():  # the same step written again (e.g. a resumed run that stopped at once)
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, keep)
    distributed.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in steps[: max(len(steps) - max(keep, 1), 0)]:
        shutil.rmtree(path)


def load(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
) -> TrainerState:
    """Restore everything written by save() into the given objects; returns the trainer state."""
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng_file = path / f"rng-rank{distributed.rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
