"""`python -m trainer.check [the run's overrides] [check.KEY=VALUE ...]`: is the math right on this
cluster, and what will the run cost? Also `torchrun ... -m trainer.check ...`, and in
slurm/train.sbatch and launch/torchrun.sh before training (CHECK_FIRST=1).

It builds the run exactly as `python -m trainer` would (the same composed config, validation,
backend, model, precision, chunking, packing and graph keeping), writes nothing into any run
directory, and then:

  exactness.py  one chunked step of a few rows per rank against a reference computed alone, the
                gathered layout (layout.py), the gather's gradient, reductions per step, the replay
  agreement.py  what every rank must agree on (world, seed, data, weights, versions, device, NCCL)
  fabric.py     the all-gather and all-reduce at the step's sizes, per rank, the slowest named
  cost.py       the chunk budget, peak memory, one timed step, the input path, the projected run
  report.py     the table on stdout and check.json; exit status 0 only if every check held
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from trainer.core import distributed


def _failure_lines(failures: list) -> list[str]:
    """Every rank's failures as lines: one a rank alone has names it ("rank 3: ..."), one every
    rank shares is said once ("every rank: ...")."""
    every_rank = distributed.all_gather_object([f.message for f in failures])
    shared = set.intersection(*map(set, every_rank)) if len(every_rank) > 1 else set()
    lines = [f"every rank: {message}" for message in dict.fromkeys(m for m in every_rank[0] if m in shared)]
    for rank, messages in enumerate(every_rank):
        lines += [f"rank {rank}: {message}" for message in dict.fromkeys(messages) if message not in shared]
    return lines


def run_check(argv: list[str]) -> dict:
    """The whole check of argv (the run's overrides and check.* keys); returns the report (every rank)."""
    from trainer.run.build import build_run
    from trainer.tools.check.agreement import check_agreement
    from trainer.tools.check.cost import measure_cost
    from trainer.tools.check.exactness import check_exactness
    from trainer.tools.check.fabric import measure_fabric
    from trainer.tools.check.settings import compose_run_config, split_overrides

    env = distributed.init_distributed()
    settings, overrides = split_overrides(argv)
    cfg = compose_run_config(overrides)
    with tempfile.TemporaryDirectory(prefix="trainer-check-") as scratch:
        run = build_run(cfg, Path(scratch) / "run")  # a run folder of its own, removed at the end
        every_rank, disagreements = check_agreement(run)
        exactness = check_exactness(run, settings.rows, settings.chunk_rows)
        fabric = measure_fabric(run, settings.repeats)
        cost = measure_cost(run, settings.input_batches)
    failures = _failure_lines(exactness.failures)
    failures += [f"rank {rank}: {what}" for rank, what in disagreements]
    return {
        "ok": not failures, "failures": failures, "world_size": env.world_size,
        "backend": run.backend_description, "precision": cfg.trainer.precision.value,
        "device": every_rank[0]["device"], "overrides": overrides, "exactness": exactness.figures,
        "ranks": every_rank, "disagreements": [{"rank": r, "what": w} for r, w in disagreements],
        "fabric": fabric, "cost": cost, "settings": vars(settings),
    }


def main(argv: list[str] | None = None) -> int:
    from trainer.data import DataError
    from trainer.run.app import fail
    from trainer.run.checkpoint import CheckpointError
    from trainer.tools.check.report import table, write

    argv = sys.argv[1:] if argv is None else argv
    try:
        report = run_check(argv)
    except (DataError, ValueError, CheckpointError) as err:
        fail(str(err))
    except Exception as err:  # Hydra's and OmegaConf's composition errors: one line, as for a run
        if type(err).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        fail(str(err).strip().splitlines()[0])
    if distributed.is_main():
        print(table(report), flush=True)
        print(f"wrote {write(report, report['settings']['output'])}", flush=True)
    distributed.barrier()
    distributed.teardown()
    return 0 if report["ok"] else 1
