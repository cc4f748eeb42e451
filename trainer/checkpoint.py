"""Step-N checkpoints that are either complete or absent.

A checkpoint is written to checkpoints/step-N.tmp and renamed to step-N only once every rank has
written its part, so a crash at any moment leaves the previous complete checkpoint as the latest.
The training backend writes model, optimizer, scheduler (and scaler) state: under DDP rank 0
writes the replicated state, under DeepSpeed every rank its shards (backends.py). Rank 0 writes
the trainer state; every rank writes its own RNG states, since each rank draws its own dropout
masks.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
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
    early_stopping: dict | None = None  # EarlyStopping.state_dict() at this step
    stopped_early: bool = False  # the run ended here on a plateau: there is nothing left to do


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


def save(run_dir: Path, state: TrainerState, save_state: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoints/step-<state.step> atomically (collective: every rank must call it).
    save_state(folder) writes the backend's part; every rank calls it."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{state.step}"
    tmp = root / f"step-{state.step}.tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an attempt that crashed
        tmp.mkdir(parents=True)
    distributed.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{distributed.rank()}.pt")
    save_state(tmp)
    distributed.barrier()  # every rank's files are written
    if distributed.is_main():
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


def load(path: Path, load_state: Callable[[Path], None]) -> TrainerState:
    """Restore everything written by save(): load_state(path) the backend's part (every rank
    calls it), then this rank's RNG; returns the trainer state."""
    load_state(path)
    rng_file = path / f"rng-rank{distributed.rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
