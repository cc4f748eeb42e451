"""From `data.train` to memory-mapped, tokenised sources, with the work done once per node.

On each node the process with local rank 0 builds whatever is missing from the cache (using all
the node's cores) while the node's other ranks wait; then every rank maps the same files. The
wait is a collective of its own with a long timeout: a first build of 100M pairs may take far
longer than the process group's timeout allows a rank to idle. A bad row found by the builder
stops every rank with the builder's one-line error.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from trainer.core import distributed
from trainer.data.batches import TrainingData
from trainer.data.cache import (
    CachedRows,
    TokenSettings,
    default_cache_dir,
    ensure_cached,
)
from trainer.data.records import Columns, DataError
from trainer.data.sources import Source

BUILD_TIMEOUT = datetime.timedelta(days=2)


def prepare(
    sources: list[Source],
    columns: Columns,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenSettings,
    cache_dir: str | Path | None = None,
) -> TrainingData:
    """Every source's files tokenised (built once, or found in the cache) and mapped."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    env = distributed.read_env()
    say = distributed.say

    def cache_all(progress: bool):
        return [[ensure_cached(p, columns, tokenizer, settings, cache_dir, progress, say) for p in s.paths] for s in sources]

    if env.local_rank == 0:
        try:
            cached, error = cache_all(progress=distributed.is_main()), None
        except DataError as err:
            cached, error = None, str(err)
    else:
        cached, error = None, None
    errors = distributed.gather_objects(error, timeout=BUILD_TIMEOUT)
    if any(errors):
        raise DataError(next(e for e in errors if e))
    if cached is None:  # the node's builder is done: these only open what it built
        cached = cache_all(progress=False)
    tables = [CachedRows([f.folder for f in files]) for files in cached]
    for source, table in zip(sources, tables):
        if len(table) == 0:
            raise DataError(f"no training rows in {', '.join(source.paths)}")
    return TrainingData(
        names=[s.name for s in sources],
        tables=tables,
        min_negatives=[min(f.min_negatives for f in files) for files in cached],
        scored_rows=[sum(f.scored_rows for f in files) for files in cached],
    )


def require_scores(data: TrainingData, sources: list[Source], why: str) -> None:
    """DataError unless every row of every source has teacher scores."""
    for source, scored, size in zip(sources, data.scored_rows, data.sizes):
        if scored != size:
            raise DataError(
                f"{', '.join(source.paths)}: {why} needs teacher scores for every row, but {size - scored} of {size} "
                "rows have none (a 'scores' list aligned with [positive] + negatives, or FlagEmbedding's "
                "pos_scores / neg_scores; python -m trainer.score adds them)"
            )


def resolve_num_negatives(data: TrainingData, sources: list[Source], wanted: int | None, missing: str) -> int:
    """data.num_negatives, checked against what the rows have; None = as many as every row has."""
    available = min(data.min_negatives)
    if wanted is None:
        return available
    if wanted > available and missing == "error":
        k = data.min_negatives.index(available)
        raise DataError(
            f"{', '.join(sources[k].paths)}: data.num_negatives={wanted}, but some rows have only {available} hard "
            "negatives (data.missing_negatives=pad tops them up with other rows' positives)"
        )
    return wanted
