"""What the evaluate and calibrate tools share: their model, loaded from EvaluateConfig's keys, and
the line that says what they score."""

from __future__ import annotations

from collections.abc import Callable

from trainer.core import distributed
from trainer.core.embedders import load_embedders
from trainer.core.model import resolve_device
from trainer.eval.beir import BeirSet


def tool_embedders(cfg) -> tuple[Callable, Callable, int]:
    """(query embedder, document embedder, batch size) of a tool's model settings (EvaluateConfig's
    keys): the model on this rank's device, a batch that runs out of memory split in two."""
    device = resolve_device(cfg.device, distributed.read_env().local_rank)
    model = load_embedders(cfg.model, device, cfg.precision.value, cfg.pooling.value if cfg.pooling else None,
                           cfg.trust_remote_code, (cfg.query_prefix, cfg.doc_prefix),
                           (cfg.query_max_length, cfg.doc_max_length), cfg.batch_size, say=distributed.say)
    return model.embed_queries, model.embed_docs, model.batch_size


def describe_set(cfg, data: BeirSet, split: str) -> str:
    return (f"{cfg.model} on {cfg.data} ({split}): {len(data.query_ids)} queries, {len(data.corpus_ids)} documents, "
            f"{distributed.world_size()} rank(s)")
