"""What a GradCache step needs to stop cleanly: the generators' state, and out-of-memory errors
turned into one agreed StepOutOfMemory on every rank."""

from __future__ import annotations

import contextlib

from torch import nn

from trainer.core import distributed
from trainer.core.memory import is_out_of_memory
from trainer.core.rng import RngState


class StepOutOfMemory(RuntimeError):
    """A step ran out of memory (on this rank or another) where it could stop cleanly: nothing
    was applied, gradients are None again and the generators are where the step began. Running
    it again with smaller chunks gives exactly what those chunks give (see autochunk.py)."""

    def __init__(self, phase: str, cause: BaseException | None) -> None:
        where = "on this rank" if cause is not None else "on another rank"
        super().__init__(f"out of memory in {phase} {where}" + (f": {cause}" if cause is not None else ""))
        self.phase = phase


class OomGuard:
    """Turns out-of-memory errors of one step into StepOutOfMemory on every rank at once.

    phase(name): a block whose out-of-memory error is caught; on leaving it every rank says
    whether it failed (one small all-reduce), and if any did, all raise together, having put
    the generators back where the step began and dropped every gradient the step made. A block
    with alone=True is guarded only in a single process: with several, its collectives (the
    loss's gather, DDP's reduction) would be left half done by a rank that stopped.
    """

    def __init__(self, module: nn.Module) -> None:
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        if any(p.grad is not None for p in self.parameters):
            raise ValueError("recover_oom needs the gradients cleared (None) before the step")
        self.rng = RngState()
        self.single = distributed.world_size() == 1

    @contextlib.contextmanager
    def phase(self, name: str, alone: bool = False):
        if alone and not self.single:
            yield
            return
        failure = None
        try:
            yield
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            failure = err
        if distributed.any_rank(failure is not None):
            for p in self.parameters:
                p.grad = None
            self.rng.restore()
            raise StepOutOfMemory(name, failure) from failure


def guarded(guard: OomGuard | None, name: str, alone: bool = False) -> contextlib.AbstractContextManager:
    """guard.phase(name, alone), or nothing when the step is not guarded."""
    return guard.phase(name, alone) if guard is not None else contextlib.nullcontext()
