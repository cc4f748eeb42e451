"""`python -m trainer.evaluate model=PATH data=BEIR_DIR [key=value ...]`: a model's retrieval figures
on a BEIR-layout set (trainer/eval/), on every rank torchrun starts; a model folder's calibration
is scored too."""

from __future__ import annotations

from pathlib import Path

from trainer.eval.beir import load_beir
from trainer.eval.evaluate import evaluate
from trainer.tools.common import describe_set, tool_embedders


def _run(cfg) -> None:
    from trainer.core import distributed
    from trainer.eval.calibration import CALIBRATION_FILE, load_calibration

    data = load_beir(cfg.data, cfg.split)
    calibration_file = Path(cfg.model) / CALIBRATION_FILE
    calibration = load_calibration(calibration_file) if calibration_file.is_file() else None
    embed_queries, embed_docs, batch_size = tool_embedders(cfg)
    distributed.say(describe_set(cfg, data, cfg.split) + (f"; its {CALIBRATION_FILE} is scored too" if calibration else ""))
    result = evaluate(embed_queries, embed_docs, data, batch_size, progress=True, calibration=calibration)
    if distributed.is_main():
        print("  ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)
        if cfg.output:
            import json

            Path(cfg.output).write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    """`python -m trainer.evaluate model=PATH data=BEIR_DIR [key=value ...]` (conf/tools/evaluate.yaml)."""
    from trainer.tools.runner import run_tool

    run_tool("evaluate", _run)


if __name__ == "__main__":
    main()
