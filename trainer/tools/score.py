"""`python -m trainer.score`: a teacher's scores of every row's [positive] + negatives.

    python -m trainer.score input=mined.jsonl output=scored.jsonl teacher=path/to/cross-encoder

Each row of the input (any format data.train reads, validated the same way) comes out with
`scores`, a list aligned with [positive] + negatives: a cross-encoder's raw logits, or a
bi-encoder's cosines (teacher.py). Any scores the row had are replaced. `loss.distill` trains
on them. Under torchrun every rank scores its share of the pairs (batched by length); rank 0
writes the output, into a temporary file renamed when complete.
"""

from __future__ import annotations

import time

import numpy as np

from trainer.core import distributed
from trainer.data import Columns, DataError
from trainer.data.output import check_output, write_rows
from trainer.data.records import FLAG_SCORES
from trainer.data.sources import file_kind, raw_rows, text_batches
from trainer.mining.teacher import load_teacher


def read_groups(path: str, columns: Columns) -> tuple[list[str], list[str], np.ndarray]:
    """(query of each pair, document of each pair, pairs per row): every row's [positive] +
    negatives, flattened, validated as for training."""
    queries, docs, counts = [], [], []
    for table in text_batches(path, columns):
        for query, positive, negatives in zip(*(table.column(c).to_pylist() for c in ("query", "positive", "negatives"))):
            group = [positive, *negatives]
            queries += [query] * len(group)
            docs += group
            counts.append(len(group))
    if not counts:
        raise DataError(f"{path}: no rows")
    return queries, docs, np.asarray(counts, dtype=np.int64)


def score(cfg) -> dict:
    """Run the scoring described by cfg (conf/tools/score.yaml); returns the summary (every rank)."""
    from trainer.mining.teacher import score_pairs

    started = time.perf_counter()
    check_output(cfg.input, cfg.output, cfg.overwrite)
    file_kind(cfg.input)
    columns = Columns(cfg.query_column, cfg.positive_column, cfg.negatives_column, cfg.negative_prefix)
    queries, docs, counts = read_groups(cfg.input, columns)
    say = distributed.say
    teacher = load_teacher(cfg)
    say(f"{len(counts)} rows, {len(docs)} pairs; teacher {cfg.teacher} ({teacher.kind}); {distributed.world_size()} rank(s)")
    scores, pairs_per_s = score_pairs(teacher, queries, docs, cfg.teacher_batch_size)
    bounds = np.concatenate([[0], np.cumsum(counts)])

    def scored_rows():
        for i, row in enumerate(raw_rows(cfg.input, columns)):
            kept = {k: v for k, v in row.items() if k not in ("scores", *FLAG_SCORES)}
            yield {**kept, "scores": [round(float(s), 6) for s in scores[bounds[i] : bounds[i + 1]]]}

    if distributed.is_main():
        written = write_rows(cfg.output, scored_rows())
        if written != len(counts):  # the raw reader and the validated one disagree: never silently
            raise DataError(f"{cfg.input}: read {len(counts)} rows but wrote {written}")
    distributed.barrier()
    summary = {"rows": len(counts), "pairs": len(docs), "teacher_kind": teacher.kind, "pairs_per_s": pairs_per_s,
               "mean_positive_score": float(scores[bounds[:-1]].mean()), "seconds": time.perf_counter() - started}
    say(f"scored {summary['pairs']} pairs in {summary['seconds']:.1f} s ({pairs_per_s:.1f} pairs/s); "
        f"mean positive score {summary['mean_positive_score']:.4f}; wrote {cfg.output}")
    return summary


def main() -> None:
    """`python -m trainer.score input=... output=... teacher=PATH [key=value ...]` (conf/tools/score.yaml)."""
    from trainer.tools.runner import run_tool

    run_tool("score", score)


if __name__ == "__main__":
    main()
