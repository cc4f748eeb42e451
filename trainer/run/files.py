"""Reading what a run folder holds: its step records (metrics.jsonl, eval.jsonl), the overrides it
was started with (.hydra/overrides.yaml) and its kept step (best.json). Light on purpose (no
torch): the plotting, summary and model-card code read runs with it, in or out of a run."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE, EVAL_FILE, BEST_FILE = "metrics.jsonl", "eval.jsonl", "best.json"
EVAL_METRICS = ("ndcg@10", "recall@10", "mrr@10")  # what each eval.jsonl record holds


def read_records(path: Path) -> list[dict]:
    """A .jsonl file of {"step": ...} records, one per step in step order. A step written twice
    (a run that crashed after logging and resumed before its checkpoint) keeps its last record;
    a torn last line (a run killed mid-write) is left out. A missing file has no records."""
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides the run was (last) started with, as typed; [] if unknown."""
    import yaml

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


def overrides_dict(run_dir: Path) -> dict[str, str]:
    """read_overrides as key -> value (the '+' / '~' prefixes of added or removed keys kept)."""
    return dict(o.split("=", 1) for o in read_overrides(run_dir) if "=" in o)


def kept_step(run_dir: Path) -> int | None:
    """With early stopping, the step whose model the run keeps (best.json); None without."""
    path = Path(run_dir) / BEST_FILE
    return json.loads(path.read_text())["step"] if path.exists() else None
