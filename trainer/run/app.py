"""What every Hydra app of the package shares (the training app and the tools): where conf/ is,
and how a run ends on bad input."""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.core import distributed

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def fail(message: str) -> None:
    """One clear line on rank 0, exit status 2 on every rank."""
    if distributed.is_main():
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
