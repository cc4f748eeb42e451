"""Step-N checkpoints that are complete and verified, or skipped.

A checkpoint is written to checkpoints/step-N.tmp: the backend's part (model, optimizer,
scheduler, scaler; under DDP rank 0 writes the replicated state, under DeepSpeed every rank its
shards, see backends.py), every rank's RNG states (each rank draws its own dropout masks) and
rank 0's trainer state. Then the manifest (manifest.py: sizes and SHA-256 of every file) is
written last, and the folder is renamed to step-N. A crash or a full disk at any moment leaves
the previous checkpoint as it was.

On resume the newest step-N whose manifest verifies is used; a broken one (cut short, a file
missing or changed) is reported in one line and moved aside to broken-step-N, where nothing
counts or deletes it. Pruning (checkpoint.keep) deletes only checkpoints older than the one just
written and verified, so the last verified checkpoint is never deleted.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.core import distributed
from trainer.core.rng import RngState
from trainer.run import manifest, safe_load

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer: where it is."""

    step: int  # optimizer steps completed
    wandb_id: str | None = None
    early_stopping: dict | None = None  # EarlyStopping.state_dict() at this step
    stopped_early: bool = False  # the run ended here on a plateau: there is nothing left to do
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient
    bad_steps_in_a_row: int = 0  # of those, how many came last (trainer.max_bad_steps stops the run)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder in root, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))


def newest(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step, not verified (e.g. to name it in a message)."""
    steps = _step_dirs(checkpoint_dir(run_dir))
    return steps[-1][1] if steps else None


def latest(run_dir: Path, say: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies against its manifest, or None (a collective: every
    rank gets the same answer). Broken ones newer than it are reported through say (on rank 0)
    and moved aside to broken-step-N."""
    root = checkpoint_dir(run_dir)
    for step, path in reversed(_step_dirs(root)):
        wrong = manifest.problem(path)
        if wrong is None:
            return path
        aside = root / f"broken-{path.name}"
        if distributed.is_main():
            n = 1
            while aside.exists():
                n += 1
                aside = root / f"broken-{path.name}.{n}"
            path.rename(aside)
            say(f"checkpoint {path} is broken ({wrong}): skipped, moved to {aside.name}")
        distributed.barrier()
    return None


def save(run_dir: Path, state: TrainerState, save_state: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoints/step-<state.step>, verified, atomically (collective: every rank must call
    it). save_state(folder) writes the backend's part; every rank calls it. If any rank fails to
    write (a full disk, a lost mount), the partial folder is removed, the previous checkpoints
    stay as they are, and every rank raises CheckpointError."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{state.step}"
    tmp = root / f"step-{state.step}.tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an attempt that crashed
        tmp.mkdir(parents=True)
    distributed.barrier()
    error = None
    try:
        torch.save(RngState(every_generator=True).to_dict(), tmp / f"rng-rank{distributed.rank()}.pt")
        save_state(tmp)
        if distributed.is_main():
            (tmp / "trainer_state.json").write_text(json.dumps(state.__dict__))
    except OSError as err:
        error = f"rank {distributed.rank()}: {err}"
    errors = [e for e in distributed.gather_objects(error) if e is not None]  # every rank's files are written, or not
    if not errors:
        try:
            manifest.write(tmp)
        except OSError as err:
            errors = [f"rank {distributed.rank()}: {err}"]
        errors = [e for part in distributed.gather_objects(errors) for e in part]
    if errors:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        previous = _step_dirs(root)
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointError(
            f"could not write checkpoint {final} ({'; '.join(dict.fromkeys(errors))}); {kept}. "
            "Free space (or fix the file system) and run the same command to resume."
        )
    if distributed.is_main():
        if final.exists():  # the same step written again (e.g. a resumed run that stopped at once)
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, final, keep)
    distributed.barrier()
    return final


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Delete all but the keep newest checkpoints up to newest (just written and verified);
    newer folders, if any, are not counted and not touched."""
    older = [path for step, path in _step_dirs(root) if step < int(newest.name.removeprefix("step-"))]
    for path in older[: max(len(older) - (max(keep, 1) - 1), 0)]:
        shutil.rmtree(path)


def load(path: Path, load_state: Callable[[Path], None]) -> TrainerState:
    """Restore everything written by save(): load_state(path) the backend's part (every rank
    calls it), then this rank's RNG; returns the trainer state."""
    load_state(path)
    rng_file = path / f"rng-rank{distributed.rank()}.pt"
    if rng_file.exists():
        RngState.from_dict(safe_load.load(rng_file)).restore()
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
