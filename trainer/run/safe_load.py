"""Loading checkpoint files without running what they hold.

torch.load(weights_only=False) unpickles arbitrary objects, so a checkpoint file someone swapped
can run any code when a run resumes. Every file the trainer reads back is loaded with
weights_only=True: tensors, numbers, strings and containers, plus the few classes listed here
that DeepSpeed's own files hold. Anything else is refused with one line naming the file and the
object it wanted to build.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds an object outside the allowlist."""


def _refusal(path: Path | str, err: Exception) -> UnsafeCheckpointError:
    match = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch names the class or function it refused
    what = match.group(1) if match else "an object outside the allowlist"
    return UnsafeCheckpointError(
        f"{path}: refused to load {what}: checkpoint files may hold only tensors and plain data "
        "(weights_only=True). Was it tampered with, or written by other code? Remove that checkpoint "
        "folder to resume from an earlier one."
    )


def load(path: Path, map_location: str | torch.device = "cpu"):
    """torch.load(path, weights_only=True), with a one-line error for a refused object."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None


def deepspeed_globals() -> list:
    """The classes DeepSpeed's ZeRO checkpoint files pickle besides tensors (checked on 0.19)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_everywhere(folder: Path, allowed: list) -> Iterator[None]:
    """Inside: every torch.load is weights_only=True, even a library's that asks for False
    (DeepSpeed's checkpoint engine does), with `allowed` added to the allowlist."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as err:
        raise _refusal(folder, err) from None
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
