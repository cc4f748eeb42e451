"""Training data: sources -> a token cache built once per node -> memory-mapped tables ->
world-size-invariant global batches -> padded model inputs.

  records.py   the row-level view: DataError, column names, text hashes, the exact row validator
  sources.py   what data.train names; files read as validated Arrow batches
  cache.py     the token cache (key, build, open)
  prepare.py   build once per node, map on every rank
  sampling.py  which rows make global batch k (sources, weights, seeded orders)
  batches.py   hard negatives chosen, rows padded into tensors
"""

from trainer.data.batches import StepBatches, TrainingData, collate
from trainer.data.cache import TokenSettings, default_cache_dir
from trainer.data.hashing import text_hash
from trainer.data.prepare import prepare, require_scores, resolve_num_negatives
from trainer.data.records import Columns, DataError, jsonl_records
from trainer.data.sampling import BatchRows, GlobalBatches, source_weights
from trainer.data.sources import Source, parse_sources

__all__ = [
    "BatchRows", "Columns", "DataError", "GlobalBatches", "Source", "StepBatches", "TokenSettings", "TrainingData",
    "collate", "default_cache_dir", "jsonl_records", "parse_sources", "prepare", "require_scores", "resolve_num_negatives",
    "source_weights", "text_hash",
]
