"""Stop when the evaluation curve has plateaued, and remember which step was best.

MNRL / InfoNCE fine-tuning overfits fast on small data: the dev metric rises, flattens, then
falls. After `patience` evaluations in a row without a gain of more than `min_delta` over the
best so far, the run stops, and the model it exports is the best evaluation's, not the last.
The state is a few numbers saved in every checkpoint, so a resumed run decides exactly as an
uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trainer.run.files import EVAL_METRICS as METRICS


@dataclass
class EarlyStopping:
    metric: str = "ndcg@10"
    patience: int = 3
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"trainer.early_stopping.metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.patience < 1:
            raise ValueError(f"trainer.early_stopping.patience must be at least 1 (or null = off), got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"trainer.early_stopping.min_delta must be >= 0, got {self.min_delta}")

    def update(self, step: int, result: dict[str, float]) -> bool:
        """Record an evaluation; True when it is the new best (the first one always is)."""
        value = result[self.metric]
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.best_step, self.evals_since_best = value, step, 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.evals_since_best >= self.patience

    def reason(self) -> str:
        return (
            f"{self.metric} has not improved by more than {self.min_delta} for {self.evals_since_best} "
            f"evaluations (trainer.early_stopping.patience={self.patience}); best {self.best:.4f} at step {self.best_step}"
        )

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("best", "best_step", "evals_since_best")}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.evals_since_best = state["best"], state["best_step"], state["evals_since_best"]
