"""`python -m trainer.evaluate model=PATH data=BEIR_DIR [key=value ...]`: a model's retrieval figures
on a BEIR-layout set (trainer/eval/), on every rank torchrun starts; a model folder's calibration
is scored too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from trainer.eval.beir import BeirSet, load_beir
from trainer.eval.evaluate import evaluate


def say_main(text: str) -> None:
    from trainer.core import distributed

    if distributed.is_main():
        print(text, flush=True)


def tool_embedders(cfg) -> tuple[Callable, Callable, int]:
    """(query embedder, document embedder, batch size) of a tool's model settings (EvaluateConfig's
    keys): the model on this rank's device, a batch that runs out of memory split in two."""
    from trainer.core import distributed
    from trainer.core.autochunk import embedding_batch_size, split_on_oom
    from trainer.core.model import AUTOCAST_DTYPES, Encoder, load_tokenizer, resolve_device, text_embedder

    device = resolve_device(cfg.device, distributed.read_env().local_rank)
    encoder = Encoder.from_pretrained(
        cfg.model, pooling=cfg.pooling.value if cfg.pooling else None, trust_remote_code=cfg.trust_remote_code
    ).to(device).eval()
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    dtype = AUTOCAST_DTYPES[cfg.precision.value]
    batch_size = embedding_batch_size(cfg.batch_size, "batch_size", encoder, device,
                                      max(cfg.query_max_length, cfg.doc_max_length), dtype, say=say_main)
    return (
        split_on_oom(text_embedder(encoder, tokenizer, cfg.query_prefix, cfg.query_max_length, device, dtype), device),
        split_on_oom(text_embedder(encoder, tokenizer, cfg.doc_prefix, cfg.doc_max_length, device, dtype), device),
        batch_size,
    )


def describe_set(cfg, data: BeirSet, split: str) -> str:
    from trainer.core import distributed

    return (f"{cfg.model} on {cfg.data} ({split}): {len(data.query_ids)} queries, {len(data.corpus_ids)} documents, "
            f"{distributed.world_size()} rank(s)")


def _run(cfg) -> None:
    from trainer.core import distributed
    from trainer.eval.calibration import CALIBRATION_FILE, load_calibration

    data = load_beir(cfg.data, cfg.split)
    calibration_file = Path(cfg.model) / CALIBRATION_FILE
    calibration = load_calibration(calibration_file) if calibration_file.is_file() else None
    embed_queries, embed_docs, batch_size = tool_embedders(cfg)
    say_main(describe_set(cfg, data, cfg.split) + (f"; its {CALIBRATION_FILE} is scored too" if calibration else ""))
    result = evaluate(embed_queries, embed_docs, data, batch_size, progress=True, calibration=calibration)
    if distributed.is_main():
        print("  ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)
        if cfg.output:
            import json

            Path(cfg.output).write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    """`python -m trainer.evaluate model=PATH data=BEIR_DIR [key=value ...]` (conf/tools/evaluate.yaml)."""
    from trainer.apps import run_tool

    run_tool("evaluate", _run)


if __name__ == "__main__":
    main()
