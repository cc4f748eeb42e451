"""`python -m trainer [overrides]`: the Hydra app (also under torchrun, srun and accelerate launch).

The process group is joined before Hydra starts, for one reason: every rank must agree on one
run directory. Rank 0 picks the time stamp that names it and broadcasts it; ranks other than 0
write neither Hydra's .hydra/ folder nor its log file.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from trainer.core import distributed
from trainer.run import config
from trainer.run.app import CONF_DIR


def _agreed_run_stamp() -> str:
    stamp = [datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")]
    if distributed.world_size() > 1:
        dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> None:
    from trainer.data import DataError
    from trainer.run.app import fail
    from trainer.run.checkpoint import CheckpointError
    from trainer.run.loop import TrainingDiverged, train

    hydra_cfg = HydraConfig.get()
    # Runs of one multirun sweep share a W&B group named after the sweep, unless one is given.
    group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        train(cfg, Path(hydra_cfg.runtime.output_dir), wandb_group=group)
    except (DataError, ValueError, CheckpointError, TrainingDiverged) as err:
        fail(str(err))


def main() -> None:
    env = distributed.init_distributed()
    os.environ["TRAINER_RUN_STAMP"] = _agreed_run_stamp()
    if not env.is_main:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    config.register()
    try:
        app()
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
