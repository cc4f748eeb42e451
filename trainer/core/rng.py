"""Generator state, captured and put back: GradCache replays each chunk's dropout from it, a failed
step rewinds to it, and a checkpoint saves it so that a resumed run draws what it would have."""

from __future__ import annotations

import random

import numpy as np
import torch


class RngState:
    """torch's CPU generator and, if CUDA is in use, the current device's (both read on the host:
    no device sync). every_generator: Python's `random` and numpy's global generator too (what a
    checkpoint needs; a step's replay draws only from torch's)."""

    def __init__(self, every_generator: bool = False) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.python = random.getstate() if every_generator else None
        self.numpy = np.random.get_state() if every_generator else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(self.cuda)
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            np.random.set_state(self.numpy)

    def to_dict(self) -> dict:
        """Tensors and plain numbers only: what torch.load(weights_only=True) reads back."""
        state = {"torch": self.cpu}
        if self.python is not None:
            version, python_state, gauss_next = self.python
            state["python"] = [version, list(python_state), gauss_next]
        if self.numpy is not None:
            kind, keys, pos, has_gauss, gauss = self.numpy
            state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
        if self.cuda is not None:
            state["cuda"] = self.cuda
        return state

    @classmethod
    def from_dict(cls, state: dict) -> RngState:
        out = cls.__new__(cls)
        out.cpu, out.cuda, out.python, out.numpy = state["torch"], state.get("cuda"), None, None
        if "python" in state:
            version, python_state, gauss_next = state["python"]
            out.python = (version, tuple(python_state), gauss_next)
        if "numpy" in state:
            kind, keys, pos, has_gauss, gauss = state["numpy"]
            out.numpy = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
        return out
