"""The recipe at full size, as the GPU suite's `recipe` section runs it: mine hard negatives for
every training pair with the model itself (dense retrieval on the GPU), train on them with the
fast defaults (trainer=base: packed chunks, kept graphs, chunk_tokens=auto; bf16), evaluate on the
dev set before, after every epoch and at the end.

Both steps are the project's own commands (`python -m trainer.mine`, `python -m trainer`), run as
subprocesses, so what is measured is what a user runs. The model arrives in fp16 (what fits the
GPU call's 64 MiB); it is written back as an fp32 folder first, so that training keeps fp32
master weights.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fp32_copy(model: Path, out: Path) -> Path:
    from sentence_transformers import SentenceTransformer

    folder = out / "model-fp32"
    if not (folder / "modules.json").exists():
        SentenceTransformer(str(model), device="cpu").float().save(str(folder))
    return folder


def _run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed (exit {proc.returncode}): {log.read_text()[-1500:]}")


def run(model: Path, train: Path, dev: Path, out: Path, batch: int, epochs: int, negatives: int, device: str,
        max_steps: int | None = None, fp32: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model = fp32_copy(model, out) if fp32 else model
    precision = "bf16" if device == "cuda" else "fp32"
    mined = out / "mined.jsonl.gz"
    start = time.perf_counter()
    _run([sys.executable, "-m", "trainer.mine", f"input={train}", f"output={mined}", f"model.name_or_path={model}",
          "retriever=dense", f"num_negatives={negatives}", "batch_size=auto", f"precision={precision}",
          f"device={device}", "overwrite=true"], out / "mine.log")
    mine_seconds = time.perf_counter() - start
    pairs = sum(1 for _ in _lines(mined))
    steps_per_epoch = math.ceil(pairs / batch)
    run_dir = out / "run"
    start = time.perf_counter()
    _run([sys.executable, "-m", "trainer", "trainer=base", f"data.train={mined}", f"eval.data={dev}",
          f"data.batch_size={batch}", f"data.num_negatives={negatives}", f"trainer.epochs={epochs}",
          f"trainer.max_steps={max_steps or 0}", f"trainer.precision={precision}", f"trainer.device={device}",
          f"model.name_or_path={model}", f"eval.every={steps_per_epoch}", "eval.batch_size=auto", "trainer.curves=false",
          "wandb.mode=disabled", f"data.cache_dir={out / 'tokens'}", f"hydra.run.dir={run_dir}"], out / "train.log")
    train_seconds = time.perf_counter() - start
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = steps[1:] or steps  # step 1 pays for the first kernels and the optimizer's state
    mean = lambda key: (sum(s[key] for s in timed) / len(timed)) if all(key in s for s in timed) else None  # noqa: E731
    return {"pairs": pairs, "negatives": negatives, "mine_seconds": mine_seconds, "batch": batch, "epochs": epochs,
            "steps": len(steps), "train_seconds": train_seconds, "pairs_per_s": mean("pairs_per_s"),
            "tokens_per_s": mean("tokens_per_s"), "mfu": mean("mfu"), "padding": mean("padding"),
            "ndcg_before": evals[0]["ndcg@10"], "ndcg_after": evals[-1]["ndcg@10"],
            "ndcg_by_step": {e["step"]: e["ndcg@10"] for e in evals}}


def _lines(path: Path):
    import gzip

    with gzip.open(path, "rt") as f:
        yield from f
