"""Running a tool's Hydra app under any launcher: one process, torchrun or Slurm tasks (the training
app, trainer/__main__.py, adds its agreed run directory on top)."""

from __future__ import annotations

from collections.abc import Callable

from trainer.run.app import CONF_DIR, fail


def run_tool(config_name: str, body: Callable) -> None:
    """Join the process group (if launched as several), compose conf/tools/<config_name>.yaml with the
    command line, run body(cfg); bad data or settings end in one line and exit status 2."""
    import hydra

    from trainer.core import distributed
    from trainer.data import DataError
    from trainer.tools import configs

    distributed.init_distributed()
    configs.register()

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
