"""What a run reports: one logger that writes its figures to metrics.jsonl / eval.jsonl in the run
dir and to Weights & Biases (rank 0 only). The health figures are trainer/core/health.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from pathlib import Path

from trainer.core import atomic
from trainer.run.files import read_records


@contextlib.contextmanager
def _ignoring(*signals: signal.Signals):
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records up to last_step: a resumed run rewrites what came after its checkpoint (a
    torn last line, from a run killed mid-write, goes too: read_records leaves it out)."""
    if not path.exists():
        return
    kept = [record for record in read_records(path) if record["step"] <= last_step]
    atomic.write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


class RunLogger:
    """metrics.jsonl, eval.jsonl and W&B; every method is a no-op on ranks other than 0."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        resume_step: int | None,
        wandb_mode: str,
        wandb_project: str,
        wandb_group: str | None,
        wandb_entity: str | None,
        config: dict,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.wandb = None
        if not enabled:
            return
        if resume_step is not None:
            for name in ("metrics.jsonl", "eval.jsonl"):
                _truncate_jsonl(self.run_dir / name, resume_step)
        if wandb_mode != "disabled":
            import wandb

            # One W&B run per run dir: its id is kept beside the run, so a resumed run continues it.
            info_file = self.run_dir / "wandb.json"
            run_id = json.loads(info_file.read_text())["id"] if info_file.exists() else uuid.uuid4().hex[:12]
            os.environ.setdefault("WANDB_DIR", str(self.run_dir))
            # Slurm sends its stop warning to every process of the job step; W&B's service process,
            # started here, must outlive it until rank 0 has checkpointed and finished the run.
            # An ignored signal stays ignored across exec, so the service never sees the warning.
            with _ignoring(signal.SIGUSR1, signal.SIGUSR2):
                self.wandb = wandb.init(
                    id=run_id,
                    resume="allow",
                    mode=wandb_mode,
                    project=wandb_project,
                    group=wandb_group,
                    entity=wandb_entity,
                    dir=str(self.run_dir),
                    config=config,
                )
            # What W&B says it is running, for the user (and the tests) to find the run by.
            info = {"id": self.wandb.id, "group": self.wandb.group, "project": self.wandb.project, "mode": wandb_mode}
            info_file.write_text(json.dumps(info) + "\n")

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def _append(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append("metrics.jsonl", record)
        if self.wandb is not None:
            # Figures only: a text field (e.g. the step's source name) stays in metrics.jsonl.
            figures = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self.wandb.log(figures, step=record["step"])

    def log_eval(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append("eval.jsonl", record)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def summary(self, values: dict) -> None:
        """Figures that describe the whole run (e.g. the best step), in W&B's run summary."""
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
