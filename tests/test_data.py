"""Loading and validating training data; world-size-invariant global batches."""

from __future__ import annotations

import gzip
import json

import datasets
import pytest

from tests.tiny import synthetic_pairs, write_jsonl
from trainer.data import Columns, DataError, GlobalBatches, load_pairs, text_hash


def test_formats_load_the_same_rows(tmp_path):
    rows = synthetic_pairs(10, negatives=2)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.to_csv(str(tmp_path / "a.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    expected = load_pairs([str(jsonl)], Columns())
    assert expected.num_negatives == 2 and len(expected) == 10
    for source in ("a.jsonl.gz", "a.parquet", "a.csv", "saved"):
        got = load_pairs([str(tmp_path / source)], Columns())
        assert (got.queries, got.docs) == (expected.queries, expected.docs), source


def test_list_column_of_negatives_and_custom_columns(tmp_path):
    rows = [{"q": f"w{i}", "p": f"w{i} w9", "negatives": [f"w{i + 1}", f"w{i + 2}", f"w{i + 3}"]} for i in range(4)]
    pairs = load_pairs([str(write_jsonl(tmp_path / "a.jsonl", rows))], Columns(query="q", positive="p", num_negatives=2))
    assert pairs.docs[0] == ["w0 w9", "w1", "w2"]


def test_several_files_concatenate(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", synthetic_pairs(3, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", synthetic_pairs(4, seed=2))
    assert len(load_pairs([str(a), str(b)], Columns())) == 7


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"query": "w1", "positive": "w2"}\n{"query": "w3"}\n', "line 2: field 'positive' is missing"),
        ('{"query": "w1", "positive": "w2"}\n{"query": "  ", "positive": "w2"}\n', "line 2: field 'query' is empty"),
        ('{"query": "w1", "positive": "w2"}\n{"query": "w1", "positive": "w2"\n', "line 2: malformed JSON"),
        ('{"query": 7, "positive": "w2"}\n', "line 1: field 'query' must be a string, got int"),
        ('{"query": "w1", "positive": "w2", "negatives": "w3"}\n', "line 1: field 'negatives' must be a list"),
        ('{"query": "w1", "positive": "w2", "negative_1": ""}\n', "line 1: field 'negative_1' is empty"),
        ('["w1", "w2"]\n', "line 1: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_pairs([str(path)], Columns())
    assert str(err.value).startswith(f"{path}: {message}")


def test_bad_csv_row_names_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("query,positive\nw1,w2\nw3,\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3: field 'positive' is missing"):
        load_pairs([str(path)], Columns())


@pytest.mark.parametrize("source", ["missing.jsonl", "missing.parquet", "./nowhere"])
def test_missing_paths_are_clear_errors(tmp_path, source):
    with pytest.raises(DataError, match="no such file|not a supported"):
        load_pairs([str(tmp_path / source) if not source.startswith(".") else source], Columns())


def test_too_many_negatives_asked_for(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", synthetic_pairs(3, negatives=1))
    with pytest.raises(DataError, match="num_negatives=2, but some rows have only 1"):
        load_pairs([str(path)], Columns(num_negatives=2))


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    single = GlobalBatches(num_rows=100, batch_size=16, seed=3)
    for world in (2, 4, 8):
        ranks = [GlobalBatches(100, 16, 3, world_size=world, rank=r) for r in range(world)]
        for step in (0, 5, 6, 13):  # 6 steps per epoch: steps 6 and 13 are in later epochs
            assert sum((b.rows(step) for b in ranks), []) == single.rows(step)
    # Each epoch is a permutation: no row twice, the incomplete last batch dropped.
    epoch = sum((single.rows(s) for s in range(single.steps_per_epoch)), [])
    assert len(set(epoch)) == len(epoch) == 96
    assert single.rows(0) != single.rows(6)  # a new order each epoch


def test_global_batch_must_split_evenly_and_fit():
    with pytest.raises(ValueError, match="must divide evenly over 3 ranks"):
        GlobalBatches(100, 16, 0, world_size=3)
    with pytest.raises(ValueError, match="larger than the 10 training rows"):
        GlobalBatches(10, 16, 0)


def test_text_hash_is_stable_and_64_bit():
    assert text_hash("a") == text_hash("a") != text_hash("b")
    assert -(2**63) <= text_hash("anything") < 2**63
    assert json.dumps(text_hash("x"))  # plain int
