"""Running a Hydra app under any launcher: one process, torchrun or Slurm tasks.

Shared by the tools (`python -m trainer.evaluate`, `python -m trainer.mine`); the training app
(__main__.py) adds its agreed run directory on top.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def fail(message: str) -> None:
    """One clear line on rank 0, exit status 2 on every rank."""
    from trainer.core import distributed

    if distributed.is_main():
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_tool(config_name: str, body: Callable) -> None:
    """Join the process group (if launched as several), compose conf/tools/<config_name>.yaml with the
    command line, run body(cfg); bad data or settings end in one line and exit status 2."""
    import hydra

    from trainer import config
    from trainer.core import distributed
    from trainer.data import DataError

    distributed.init_distributed()
    config.register()

    # Their own folder: conf/ has groups named model/ and data/, which would take `model=PATH`.
    @hydra.main(version_base="1.3", config_path=f"{CONF_DIR}/tools", config_name=config_name)
    def app(cfg) -> None:
        try:
            body(cfg)
        except (DataError, ValueError) as err:
            fail(str(err))
        # Every rank done before any leaves the group: a rank that destroyed its Gloo group while
        # rank 0 was still writing aborted at exit ("terminate called without an active
        # exception") in about one run of six.
        distributed.barrier()

    try:
        app()
    finally:
        distributed.teardown()
