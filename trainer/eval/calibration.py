"""Calibrated scores: a map from a bi-encoder's cosine similarity to P(relevant).

Contrastive training makes cosines that rank well on a scale of their own, not probabilities.
A calibration fitted on judged pairs (`python -m trainer.calibrate`) turns them into numbers one
can threshold, abstain on or fuse:

    from trainer.calibration import load_calibration
    probability = load_calibration("outputs/run/model").apply(cosines)

Platt scaling (a logistic curve in the cosine: two parameters, smooth, hard to overfit) is the
default; isotonic regression (a monotone step function: no assumed shape, needs more pairs) is
the alternative. Also here: expected calibration error and Brier score, to judge either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.core import atomic

METHODS = ("platt", "isotonic")
CALIBRATION_FILE = "calibration.json"


@dataclass
class Calibration:
    method: str
    params: dict
    """platt: {"slope", "intercept"} of P = sigmoid(slope * cosine + intercept);
    isotonic: {"x", "y"}, the step function's knots (linear between them, flat beyond)."""
    info: dict = field(default_factory=dict)
    """Where and how it was fitted, and how well it did (written by trainer.calibrate)."""

    def apply(self, scores):
        """P(relevant) for cosine scores: a number, a list, a numpy array or a torch tensor
        (returned as the same kind, float64 for numpy, the input's dtype for torch)."""
        values = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
        if self.method == "platt":
            z = self.params["slope"] * values + self.params["intercept"]
            probs = np.exp(-np.logaddexp(0.0, -z))  # sigmoid without overflow for large |z|
        elif self.method == "isotonic":
            probs = np.interp(values, self.params["x"], self.params["y"])
        else:
            raise ValueError(f"unknown calibration method {self.method!r} (expected one of {METHODS})")
        if hasattr(scores, "detach"):
            import torch

            return torch.as_tensor(probs, dtype=scores.dtype if scores.is_floating_point() else torch.float64, device=scores.device)
        return float(probs) if np.ndim(probs) == 0 else probs

    def to_dict(self) -> dict:
        return {"method": self.method, "params": self.params, **self.info}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        return atomic.write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def load_calibration(path: str | Path) -> Calibration:
    """A model folder's calibration.json (or that file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / CALIBRATION_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no calibration (fit one with python -m trainer.calibrate model=... data=...)")
    record = json.loads(path.read_text())
    method, params = record.pop("method", None), record.pop("params", None)
    if method not in METHODS or not isinstance(params, dict):
        raise ValueError(f"{path}: not a calibration file (needs \"method\" in {METHODS} and \"params\")")
    return Calibration(method, params, record)


def fit_calibration(scores, labels, method: str = "platt") -> Calibration:
    """Fit P(relevant | cosine) on judged pairs: scores (cosines) and labels (1 relevant, 0 not)."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"calibration needs as many labels as scores, and some: {len(x)} scores, {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise ValueError("calibration needs both relevant and non-relevant pairs; these are all one kind")
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        # C=inf: the maximum-likelihood fit, no shrinkage of the slope toward 0.
        model = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(x[:, None], y)
        return Calibration("platt", {"slope": float(model.coef_[0, 0]), "intercept": float(model.intercept_[0])})
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y)
        return Calibration("isotonic", {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()})
    raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")


def reliability(probs, labels, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of predicted probability over [0, 1] that holds any pair: (mean
    prediction, fraction relevant, number of pairs)."""
    p, y = np.asarray(probs, dtype=np.float64).ravel(), np.asarray(labels, dtype=np.float64).ravel()
    which = np.clip((p * bins).astype(np.int64), 0, bins - 1)  # p = 1.0 falls in the last bin
    counts = np.bincount(which, minlength=bins)
    held = counts > 0
    mean_pred = np.bincount(which, weights=p, minlength=bins)[held] / counts[held]
    frac_pos = np.bincount(which, weights=y, minlength=bins)[held] / counts[held]
    return mean_pred, frac_pos, counts[held]


def expected_calibration_error(probs, labels, bins: int = 10) -> float:
    """ECE: the pairs-weighted mean gap between predicted probability and observed frequency of
    relevance, over equal-width bins (0 = calibrated)."""
    mean_pred, frac_pos, counts = reliability(probs, labels, bins)
    return float(np.sum(counts * np.abs(mean_pred - frac_pos)) / max(counts.sum(), 1))


def brier_score(probs, labels) -> float:
    """Mean squared difference between predicted probability and the 0/1 label."""
    p, y = np.asarray(probs, dtype=np.float64).ravel(), np.asarray(labels, dtype=np.float64).ravel()
    return float(np.mean((p - y) ** 2))


def uncalibrated(scores) -> np.ndarray:
    """The cosine read as a probability, as one does without a calibration: clipped to [0, 1]."""
    return np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)


def cross_validated(scores, labels, groups, method: str = "platt", folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold probabilities: the groups (queries) are dealt into `folds` folds at random
    (seeded), and each fold's pairs are mapped by a calibration fitted on the other folds. What a
    calibration does to pairs it has not seen, without a second judged split."""
    x, y, g = (np.asarray(a).ravel() for a in (scores, labels, groups))
    unique = np.unique(g)
    if folds < 2 or len(unique) < folds:
        raise ValueError(f"cross-validation needs 2 <= folds <= queries; got folds={folds} over {len(unique)} queries")
    fold_of = dict(zip(unique[np.random.default_rng(seed).permutation(len(unique))], np.arange(len(unique)) % folds))
    pair_fold = np.array([fold_of[q] for q in g])
    out = np.empty(len(x), dtype=np.float64)
    for fold in range(folds):
        held = pair_fold == fold
        out[held] = fit_calibration(x[~held], y[~held], method).apply(x[held])
    return out
