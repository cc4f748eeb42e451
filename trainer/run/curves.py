"""Curves of runs: loss, learning rate, accuracy and embedding spread by step, NDCG@10 and recall@10
at each evaluation, the kept step of an early-stopped run; and the calibration's reliability
diagram. A training run draws its own curves.png at each evaluation and at the end
(BackgroundPlot, in a child process: `python -m trainer.plot`, trainer/tools/plot.py)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.core import atomic
from trainer.run.files import (
    BEST_FILE,
    EVAL_FILE,
    METRICS_FILE,
    kept_step,
    overrides_dict,
    read_overrides,
    read_records,
)

CURVES_FILE = "curves.png"
# (record key, axis label): the training records' panels, then the evaluations'.
TRAIN_PANELS = (
    ("loss", "training loss (nats)"),
    ("lr", "learning rate"),
    ("accuracy", "in-batch top-1 accuracy"),
    ("emb_std", "embedding std per dim (collapse → 0)"),
)
EVAL_PANELS = (("ndcg@10", "eval NDCG@10"), ("recall@10", "eval recall@10"))
SMOOTH_ABOVE = 60  # steps: longer curves also get a moving average, the raw one kept faint


@dataclass
class RunCurves:
    label: str
    metrics: list[dict]
    evals: list[dict]
    kept: int | None


def load_run(run_dir: Path, label: str | None = None) -> RunCurves:
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).exists() and not (run_dir / EVAL_FILE).exists():
        raise FileNotFoundError(f"{run_dir}: neither {METRICS_FILE} nor {EVAL_FILE} (is it a run folder?)")
    if label is None:  # one run: its folder and what it was started with
        label = " ".join([run_dir.name + ":", *read_overrides(run_dir)]).rstrip(":")
        label = label if len(label) <= 120 else label[:117] + "..."
    return RunCurves(label, read_records(run_dir / METRICS_FILE), read_records(run_dir / EVAL_FILE), kept_step(run_dir))


def labels_for(run_dirs: list[Path]) -> list[str]:
    """Each run's overrides that differ between the runs ('loss.temperature=0.02 data.batch_size=64');
    the folder names where the overrides do not tell them apart."""
    overrides = [overrides_dict(d) for d in run_dirs]
    keys = sorted({k for o in overrides for k in o})
    differing = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    labels = [" ".join(f"{k}={o[k]}" for k in differing if k in o) for o in overrides]
    if len(set(labels)) < len(labels) or not all(labels):
        names = [d.name for d in run_dirs]
        if len(set(names)) < len(names):
            names = [f"{d.parent.name}/{d.name}" for d in run_dirs]
        labels = [f"{name}: {label}" if label else name for name, label in zip(names, labels)]
    return labels


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _draw_panel(ax, run: RunCurves, key: str, color, is_eval: bool) -> None:
    records = run.evals if is_eval else run.metrics
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if not points:
        return
    steps, values = zip(*points)
    if is_eval:
        ax.plot(steps, values, marker="o", markersize=4, color=color)
        if run.kept is not None and run.kept in steps:
            ax.plot([run.kept], [values[steps.index(run.kept)]], marker="*", markersize=14, color=color,
                    markeredgecolor="black", linestyle="none")
    elif len(values) > SMOOTH_ABOVE and key in ("loss", "accuracy"):
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _moving_average(list(values), max(5, len(values) // 30)), color=color, linewidth=1.6)
    else:
        ax.plot(steps, values, color=color, linewidth=1.4, marker="." if len(values) <= 30 else None)
    if run.kept is not None:
        ax.axvline(run.kept, color=color, linestyle=":", linewidth=1.2)


def _save(fig, out: Path) -> Path:
    """The figure as a PNG written beside out and renamed: a reader never sees a torn picture."""
    out = Path(out)
    with atomic.replacing(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return out


def draw_curves(runs: list[RunCurves], out: Path, title: str | None = None) -> Path:
    """Six panels by step, runs overlaid, into out (_save)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(14, 7.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (key, label) in zip(axes, TRAIN_PANELS + EVAL_PANELS):
        is_eval = (key, label) in EVAL_PANELS
        for run, color in zip(runs, colors):
            _draw_panel(ax, run, key, color, is_eval)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci" if key == "lr" else "plain", scilimits=(-2, 3), useOffset=False)
        if is_eval and not any(run.evals for run in runs):
            ax.text(0.5, 0.5, "no evaluation (eval.data)", ha="center", va="center", transform=ax.transAxes, color="grey")
    last_step = max([r["step"] for run in runs for r in run.metrics + run.evals] or [1])
    for ax in axes:  # one step axis for all panels: evaluations (from step 0) line up with training
        ax.set_xlim(-0.02 * last_step, 1.02 * last_step)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], color=c, linewidth=2) for c in colors] if len(runs) > 1 else []
    names = [run.label for run in runs] if len(runs) > 1 else []
    if any(run.kept is not None for run in runs):
        handles.append(Line2D([], [], color="black", linestyle=":", marker="*", markersize=10))
        names.append("kept step (early stopping: the exported model)")
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=min(3, len(handles)), fontsize=9)
    fig.suptitle(title or (runs[0].label if len(runs) == 1 else f"{len(runs)} runs"), fontsize=12)
    return _save(fig, out)


def draw_calibration(out: Path, scores, labels, calibrated, calibration, bins: int = 10, title: str = "") -> Path:
    """The reliability diagram of held-out judged pairs: observed frequency of relevance against
    predicted probability, before (the cosine clipped to [0, 1]) and after calibration; beside it,
    the cosines of relevant and non-relevant pairs and the fitted map from cosine to probability."""
    import numpy as np
    from matplotlib.figure import Figure

    from trainer.eval.calibration import (
        expected_calibration_error,
        reliability,
        uncalibrated,
    )

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    fig = Figure(figsize=(12, 5), layout="constrained")
    diagram, spread = fig.subplots(1, 2)
    diagram.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for probs, name, color in ((uncalibrated(scores), "cosine as probability", "C3"), (calibrated, calibration.method, "C0")):
        mean_pred, frac_pos, counts = reliability(probs, labels, bins)
        ece = expected_calibration_error(probs, labels, bins)
        diagram.plot(mean_pred, frac_pos, marker="o", color=color, label=f"{name} (ECE {ece:.3f})")
        for x, y, n in zip(mean_pred, frac_pos, counts):
            diagram.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    diagram.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(relevant)", ylabel="observed fraction relevant",
                title=f"reliability, {len(labels)} held-out pairs ({bins} bins; numbers: pairs per bin)")
    diagram.legend(loc="upper left", fontsize=9)
    diagram.grid(alpha=0.3)
    edges = np.linspace(min(scores.min(), 0.0), max(scores.max(), 1.0), 41)
    spread.hist(scores[labels == 1], bins=edges, alpha=0.5, color="C2", label="relevant pairs")
    spread.hist(scores[labels == 0], bins=edges, alpha=0.5, color="C7", label="top-ranked non-relevant pairs")
    spread.set(xlabel="cosine similarity", ylabel="pairs", title="scores, and the map fitted on them")
    fitted = spread.twinx()
    grid = np.linspace(edges[0], edges[-1], 200)
    fitted.plot(grid, calibration.apply(grid), color="C0", linewidth=2, label=f"{calibration.method}: P(relevant | cosine)")
    fitted.set(ylim=(0, 1), ylabel="P(relevant)")
    handles = spread.get_legend_handles_labels()[0] + fitted.get_legend_handles_labels()[0]
    names = spread.get_legend_handles_labels()[1] + fitted.get_legend_handles_labels()[1]
    spread.legend(handles, names, loc="upper left", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out)


class BackgroundPlot:
    """A run's curves.png, redrawn by a child process (`python -m trainer.plot RUN_DIR`): the drawing
    takes neither the training process's time nor its GIL. One child at a time; a refresh asked for
    while one draws is skipped (the next one, or finish(), draws the newer records)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.child: subprocess.Popen | None = None
        self.drawn: tuple | None = None  # the records' state the last child drew

    def refresh(self) -> None:
        if not self.enabled or self._busy() or self._records() == self.drawn:
            return
        self.drawn = self._records()
        self.child = subprocess.Popen(
            [sys.executable, "-m", "trainer.plot", str(self.run_dir), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )

    def finish(self, timeout_s: float = 120.0) -> None:
        """Wait for the child drawing, then draw the final records unless it drew them already; a
        failure is reported, never raised."""
        if not self.enabled:
            return
        try:
            self._wait(timeout_s)
            self.refresh()
            self._wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"{self.run_dir / CURVES_FILE}: drawing took over {timeout_s:.0f} s; left unfinished", flush=True)

    def _records(self) -> tuple:
        """What the picture is drawn from, as (size, modification time) of each file."""
        stats = [(self.run_dir / name) for name in (METRICS_FILE, EVAL_FILE, BEST_FILE)]
        return tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None for p in stats)

    def _busy(self) -> bool:
        if self.child is None:
            return False
        if self.child.poll() is None:
            return True
        self._report()
        return False

    def _wait(self, timeout_s: float) -> None:
        if self.child is not None:
            self.child.wait(timeout=timeout_s)
            self._report()

    def _report(self) -> None:
        child, self.child = self.child, None
        errors = child.stderr.read() if child.stderr else ""
        if child.returncode:
            last = errors.strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
            print(f"{self.run_dir / CURVES_FILE}: not drawn ({last[0]})", flush=True)
