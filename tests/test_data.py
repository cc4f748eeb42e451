"""Training data: reading and validating sources, the token cache, hard-negative choice."""

from __future__ import annotations

import gzip
import json

import datasets
import numpy as np
import torch
import pytest

from tests.tiny import WORDS, run_torchrun, synthetic_pairs, write_jsonl, write_tiny_model
from trainer.data import (
    Columns, DataError, GlobalBatches, TokenSettings, collate, parse_sources, prepare, resolve_num_negatives, text_hash,
)
from trainer.data import cache as cache_module
from tests.reference_collate import cached_rows
from trainer.core.tokenizer import load_tokenizer

SETTINGS = TokenSettings(query_max_length=8, doc_max_length=12)


def global_rows(batches, step: int) -> list[int]:
    """A GlobalBatches' rows of this rank for `step`, numbered across all sources."""
    part = batches.batch_rows(step)
    return (batches.offsets[part.source] + part.row).tolist()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(str(write_tiny_model(tmp_path_factory.mktemp("model"))))


@pytest.fixture
def builds(monkeypatch):
    """Counts cache builds in this process."""
    calls = []
    real = cache_module.build
    monkeypatch.setattr(cache_module, "build", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    return calls


def prepared(tmp_path, train, tokenizer, columns=Columns(), settings=SETTINGS):
    return prepare(parse_sources(train), columns, tokenizer, settings, tmp_path / "cache")


def rows_of(data, source: int = 0) -> dict:
    return cached_rows(data.tables[source], range(len(data.tables[source])))


# ------------------------------------------------------------------------------ reading


def test_formats_load_the_same_rows(tmp_path, tokenizer):
    rows = synthetic_pairs(10, negatives=2)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl.read_bytes()))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.to_csv(str(tmp_path / "a.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    expected = rows_of(prepared(tmp_path, str(jsonl), tokenizer))
    assert expected["query_hash"] == [text_hash(r["query"]) for r in rows]
    assert expected["doc_hash"][3] == [text_hash(rows[3][k]) for k in ("positive", "negative_1", "negative_2")]
    assert expected["doc_hash"][5][0] == expected["doc_hash"][6][0]  # a shared positive: duplicate masking sees it
    for source in ("a.jsonl.gz", "a.parquet", "a.csv", "saved"):
        assert rows_of(prepared(tmp_path, str(tmp_path / source), tokenizer)) == expected, source


def test_cached_ids_are_the_tokenizers_with_prefixes_and_truncation(tmp_path, tokenizer):
    rows = [{"query": " ".join(WORDS[i : i + 2 + i]), "positive": " ".join(WORDS[i : i + 30])} for i in range(20)]
    settings = TokenSettings(query_max_length=6, doc_max_length=9, query_prefix="w100 ", doc_prefix="w101 w102 ")
    got = rows_of(prepared(tmp_path, str(write_jsonl(tmp_path / "a.jsonl", rows)), tokenizer, settings=settings))
    queries = tokenizer(["w100 " + r["query"] for r in rows], truncation=True, max_length=6)["input_ids"]
    docs = tokenizer(["w101 w102 " + r["positive"] for r in rows], truncation=True, max_length=9)["input_ids"]
    assert got["query_ids"] == queries
    assert [d[0] for d in got["doc_ids"]] == docs
    assert max(map(len, docs)) == 9 and min(map(len, queries)) < 6  # truncation and short texts both happen


def test_list_column_negatives_prefixed_ones_and_custom_columns(tmp_path, tokenizer):
    rows = [{"q": f"w{i}", "p": f"w{i} w9", "negatives": [f"w{i + 1}", f"w{i + 2}", f"w{i + 3}"][: 1 + i % 3]}
            for i in range(4)]
    rows[0]["neg_1"] = "w50"  # the list column's texts come first, then the prefixed ones
    data = prepared(tmp_path, str(write_jsonl(tmp_path / "a.jsonl", rows)), tokenizer,
                    columns=Columns(query="q", positive="p", negative_prefix="neg_"))
    hashes = rows_of(data)["doc_hash"]
    assert hashes[0] == [text_hash(t) for t in ("w0 w9", "w1", "w50")]
    assert [len(h) - 1 for h in hashes] == [2, 2, 3, 1]
    assert data.min_negatives == [1]


def test_prefixed_negatives_may_be_ragged(tmp_path, tokenizer):
    rows = [{"query": "w1", "positive": "w2", "negative_1": "w3", "negative_2": "w4"}, {"query": "w5", "positive": "w6",
            "negative_1": "w7"}]
    hashes = rows_of(prepared(tmp_path, str(write_jsonl(tmp_path / "a.jsonl", rows)), tokenizer))["doc_hash"]
    assert hashes == [[text_hash(t) for t in ("w2", "w3", "w4")], [text_hash(t) for t in ("w6", "w7")]]


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"query": "w1", "positive": "w2"}\n{"query": "w3"}\n', "line 2: field 'positive' is missing"),
        ('{"query": "w1", "positive": "w2"}\n\n{"query": "  ", "positive": "w2"}\n', "line 3: field 'query' is empty"),
        ('{"query": "w1", "positive": "w2"}\n{"query": "w1", "positive": "w2"\n', "line 2: malformed JSON"),
        ('{"query": "w1", "positive": "w2"}\n{"query": 7, "positive": "w2"}\n', "line 2: field 'query' must be a string, got int"),
        ('{"query": "w1", "positive": "w2", "negatives": "w3"}\n', "line 1: field 'negatives' must be a list"),
        ('{"query": "w1", "positive": "w2", "negatives": ["w3", " "]}\n', "line 1: field 'negatives[1]' is empty"),
        ('{"query": "w1", "positive": "w2", "negative_1": ""}\n', "line 1: field 'negative_1' is empty"),
        ('["w1", "w2"]\n', "line 1: expected a JSON object"),
        ('{"query": "w1", "positive": "w2", "negatives": ["w3"], "scores": [1.0, 0.5]}\n'
         '{"query": "w1", "positive": "w2", "negatives": ["w3"], "scores": [1.0]}\n',
         "line 2: field 'scores' has 1 scores for 2 texts"),
        ('{"query": "w1", "positive": "w2", "negatives": ["w3"], "scores": [1.0, "high"]}\n',
         "line 1: field 'scores[1]' must be a finite number, got 'high'"),
        ('{"query": "w1", "positive": "w2", "negatives": ["w3"], "pos_scores": [2.0], "neg_scores": [1.0, 0.0]}\n',
         "line 1: field 'pos_scores' + 'neg_scores' has 3 scores for 2 texts"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        prepared(tmp_path, str(path), tokenizer)
    assert str(err.value).startswith(f"{path}: {message}")


def test_bad_row_deep_in_a_big_file_is_named_and_nothing_is_left_in_the_cache(tmp_path, tokenizer):
    path = tmp_path / "big.jsonl"
    good = json.dumps({"query": "w1 w2 w3", "positive": "w1 w2 w3 w4 w5 w6"}) + "\n"
    with open(path, "w") as out:
        out.write(good * 149_999 + json.dumps({"query": "w1", "positive": ["w2"]}) + "\n" + good * 1000)
    with pytest.raises(DataError, match=r"big.jsonl: line 150000: field 'positive' must be a string, got list"):
        prepared(tmp_path, str(path), tokenizer)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_bad_csv_and_parquet_rows_name_their_line_or_row(tmp_path, tokenizer):
    path = tmp_path / "bad.csv"
    path.write_text("query,positive\nw1,w2\nw3,\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3: field 'positive' is missing"):
        prepared(tmp_path, str(path), tokenizer)
    parquet = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([{"query": "w1", "positive": "w2"}, {"query": "w3", "positive": "\t"}]).to_parquet(str(parquet))
    with pytest.raises(DataError, match=r"bad.parquet: row 1: field 'positive' is empty"):
        prepared(tmp_path, str(parquet), tokenizer)
    numbers = tmp_path / "numbers.parquet"
    datasets.Dataset.from_list([{"query": 1, "positive": "w2"}]).to_parquet(str(numbers))
    with pytest.raises(DataError, match=r"numbers.parquet: row 0: field 'query' must be a string, got int64"):
        prepared(tmp_path, str(numbers), tokenizer)


@pytest.mark.parametrize("source", ["missing.jsonl", "missing.parquet", "./nowhere"])
def test_missing_paths_are_clear_errors(tmp_path, tokenizer, source):
    with pytest.raises(DataError, match="no such file|not a supported"):
        prepared(tmp_path, str(tmp_path / source) if not source.startswith(".") else source, tokenizer)


# ------------------------------------------------------------------------- data.train specs


def test_data_train_is_a_path_a_list_or_a_mapping():
    assert [(s.name, s.paths, s.weight) for s in parse_sources("a/train.jsonl.gz")] == [("train", ("a/train.jsonl.gz",), 1.0)]
    assert [s.paths for s in parse_sources(["x.jsonl", "y.parquet"])] == [("x.jsonl", "y.parquet")]
    mapped = parse_sources({"nli": {"path": "n.jsonl", "weight": 2}, "qa": "q.jsonl", "web": ["w1.jsonl", "w2.jsonl"]})
    assert [(s.name, s.paths, s.weight) for s in mapped] == [
        ("nli", ("n.jsonl",), 2.0), ("qa", ("q.jsonl",), 1.0), ("web", ("w1.jsonl", "w2.jsonl"), 1.0)
    ]
    for bad, message in [([], "empty"), ({"a": {"file": "x"}}, "expected a path"), ({"a": {"path": "x", "weight": 0}},
                         "positive number"), (7, "must be a path")]:
        with pytest.raises(DataError, match=message):
            parse_sources(bad)


# -------------------------------------------------------------------------------- the cache


def test_the_cache_is_reused_and_rebuilt_when_its_inputs_change(tmp_path, tokenizer, builds):
    path = write_jsonl(tmp_path / "a.jsonl", synthetic_pairs(12))
    first = rows_of(prepared(tmp_path, str(path), tokenizer))
    assert rows_of(prepared(tmp_path, str(path), tokenizer)) == first
    assert len(builds) == 1  # the second run mapped the first run's files
    prepared(tmp_path, str(path), tokenizer, settings=TokenSettings(8, 11))  # a max length
    prepared(tmp_path, str(path), tokenizer, settings=TokenSettings(8, 12, query_prefix="w3 "))  # a prefix
    assert len(builds) == 3
    other_tokenizer = load_tokenizer(str(write_tiny_model(tmp_path / "other")))
    other_tokenizer.truncation_side = "left"
    prepared(tmp_path, str(path), other_tokenizer)
    assert len(builds) == 4
    write_jsonl(path, synthetic_pairs(12, seed=5))  # the file's content
    changed = rows_of(prepared(tmp_path, str(path), tokenizer))
    assert len(builds) == 5 and changed["query_hash"] != first["query_hash"]
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_two_ranks_build_the_cache_once_and_share_errors(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    good = write_jsonl(tmp_path / "a.jsonl", synthetic_pairs(40))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "w1", "positive": "w2"}\n{"query": "w1"}\n')
    output = run_torchrun("data_cache.py", str(model), str(good), str(bad), str(tmp_path / "cache"))
    report = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    assert report["builds"] == [1, 0]  # rank 0 built, rank 1 mapped what it built
    assert report["rows"] == [40, 40] and report["first_hashes_equal"]
    assert report["errors"] == [f"{bad}: line 2: field 'positive' is missing"] * 2  # one message, on every rank


# ------------------------------------------------------------------------- hard negatives


def _mined(tmp_path, tokenizer, counts: list[int]) -> tuple:
    rows = []
    for i, n in enumerate(counts):
        rows.append({"query": f"w{i}", "positive": f"w{i} w100", "negatives": [f"w{i} w{50 + j}" for j in range(n)]})
    return rows, prepared(tmp_path, str(write_jsonl(tmp_path / "mined.jsonl", rows)), tokenizer)


def test_rows_with_more_negatives_get_a_seeded_choice_per_epoch(tmp_path, tokenizer):
    rows, data = _mined(tmp_path, tokenizer, [6] * 8 + [2] * 8)
    batches = GlobalBatches(data.sizes, 16, seed=0)
    chosen = {}
    for step in (0, 1, 2):  # one step per epoch: the whole set each time
        out = collate(data, batches.batch_rows(step), tokenizer, num_negatives=2, seed=0)
        rows_in_batch = batches.batch_rows(step).row
        chosen[step] = {int(r): out["doc_hashes"][i, 1:].tolist() for i, r in enumerate(rows_in_batch)}
    for row in range(16):
        own = [text_hash(t) for t in rows[row]["negatives"]]
        for step in chosen:
            picked = chosen[step][row]
            assert len(set(picked)) == 2 and set(picked) <= set(own)  # 2 distinct of the row's own
        if row >= 8:
            assert chosen[0][row] == own  # exactly 2: all of them, in order
    assert any(chosen[0][r] != chosen[1][r] for r in range(8))  # a new draw each epoch
    again = collate(data, batches.batch_rows(1), tokenizer, num_negatives=2, seed=0)
    assert {int(r): again["doc_hashes"][i, 1:].tolist() for i, r in enumerate(batches.batch_rows(1).row)} == chosen[1]
    # Over the epochs every negative of a long list gets used.
    used = {h for step in range(12) for h in collate(data, batches.batch_rows(step), tokenizer, 2, 0)["doc_hashes"][:, 1:].ravel().tolist()}
    assert {text_hash(t) for r in rows for t in r["negatives"]} <= used


def test_rows_with_too_few_negatives_are_an_error_or_padded(tmp_path, tokenizer):
    rows, data = _mined(tmp_path, tokenizer, [3, 1, 0, 3] * 4)
    sources = parse_sources(str(tmp_path / "mined.jsonl"))
    with pytest.raises(DataError, match="num_negatives=2, but some rows have only 0 hard negatives"):
        resolve_num_negatives(data, sources, 2, "error")
    assert resolve_num_negatives(data, sources, None, "error") == 0
    n = resolve_num_negatives(data, sources, 2, "pad")
    batches = GlobalBatches(data.sizes, 16, seed=1)
    out = collate(data, batches.batch_rows(0), tokenizer, n, seed=1)
    positives = {text_hash(r["positive"]) for r in rows}
    for i, row in enumerate(batches.batch_rows(0).row):
        own = [text_hash(t) for t in rows[row]["negatives"]]
        picked = out["doc_hashes"][i, 1:].tolist()
        kept = [h for h in picked if h in own]
        assert len(kept) == min(len(own), 2)  # the row's own first...
        assert all(h in positives for h in picked if h not in own)  # ...then other rows' positives
    assert out["docs"]["input_ids"].shape[0] == 16 * 3


# ----------------------------------------------------------------------------- global batches


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    for sizes, same_source in [(100, True), ([40, 70, 33], True), ([40, 70, 33], False)]:
        single = GlobalBatches(sizes, 16, 3, weights=[1, 2, 1] if sizes != 100 else None, same_source=same_source)
        for world in (2, 4, 8):
            ranks = [GlobalBatches(sizes, 16, 3, world, r, weights=single.weights, same_source=same_source)
                     for r in range(world)]
            for step in (0, 5, 6, 13, 4100):
                assert sum((global_rows(b, step) for b in ranks), []) == global_rows(single, step)
    # One source: each epoch is a permutation, no row twice, the incomplete last batch dropped.
    single = GlobalBatches(100, 16, 3)
    epoch = sum((global_rows(single, s) for s in range(single.steps_per_epoch)), [])
    assert len(set(epoch)) == len(epoch) == 96
    assert global_rows(single, 0) != global_rows(single, 6)  # a new order each epoch


def test_weighted_sources_are_drawn_at_their_rates_and_batches_do_not_mix():
    sizes, weights = [1000, 3000], [0.25, 0.75]
    same = GlobalBatches(sizes, 32, seed=7, weights=weights, same_source=True)
    offsets = np.cumsum([0] + sizes)
    picks = []
    for step in range(2000):
        rows = np.array(global_rows(same, step))
        k = same.source_of(step)
        assert offsets[k] <= rows.min() and rows.max() < offsets[k + 1]  # one source per batch
        picks.append(k)
    assert np.mean(picks) == pytest.approx(0.75, abs=0.03)
    assert same.rows_seen(2000) == {"source0": 32 * picks.count(0), "source1": 32 * picks.count(1)}
    # Within a source, rows are used once per source epoch.
    first = [r for s in range(2000) if picks[s] == 0 for r in global_rows(same, s)][: (1000 // 32) * 32]
    assert len(set(first)) == len(first)

    mixed = GlobalBatches(sizes, 32, seed=7, weights=weights, same_source=False)
    from_second = np.mean([np.mean(np.array(global_rows(mixed, s)) >= 1000) for s in range(500)])
    assert from_second == pytest.approx(0.75, abs=0.02)
    assert sum(mixed.rows_seen(500).values()) == 500 * 32


def test_the_batch_of_a_step_does_not_depend_on_the_steps_before_it():
    """Resuming at step S computes step S's rows directly: they must equal those of a walk."""
    walked = GlobalBatches([50, 80], 8, seed=2, weights=[0.5, 0.5])
    seen = [global_rows(walked, s) for s in range(9000)]
    fresh = GlobalBatches([50, 80], 8, seed=2, weights=[0.5, 0.5])
    assert global_rows(fresh, 8999) == seen[8999] and global_rows(fresh, 4096) == seen[4096]


def test_global_batch_must_split_evenly_and_fit():
    with pytest.raises(ValueError, match="must divide evenly over 3 ranks"):
        GlobalBatches(100, 16, 0, world_size=3)
    with pytest.raises(ValueError, match="larger than the 10 training rows"):
        GlobalBatches(10, 16, 0)
    with pytest.raises(ValueError, match="larger than source 'small' \\(10 rows\\)"):
        GlobalBatches([100, 10], 16, 0, names=["big", "small"])
    GlobalBatches([100, 10], 16, 0, same_source=False)  # mixed batches may draw from a small source


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_the_row_order_is_a_permutation(n):
    from trainer.data.sampling import permute

    for key in (0, 12345):
        out = permute(np.arange(n), n, key)
        assert sorted(out.tolist()) == list(range(n))
    if n >= 64:
        assert permute(np.arange(n), n, 1).tolist() != permute(np.arange(n), n, 2).tolist()


def test_source_weights():
    from trainer.data import source_weights

    np.testing.assert_allclose(source_weights([100, 300], [1, 1], "proportional", 0.5), [0.25, 0.75])
    np.testing.assert_allclose(source_weights([100, 300], [1, 1], "uniform", 0.5), [0.5, 0.5])
    np.testing.assert_allclose(source_weights([100, 400], [1, 1], "temperature", 0.5), [1 / 3, 2 / 3])
    np.testing.assert_allclose(source_weights([100, 100], [3, 1], "uniform", 0.5), [0.75, 0.25])


def test_text_hash_is_stable_and_64_bit():
    assert text_hash("a") == text_hash("a") != text_hash("b")
    assert -(2**63) <= text_hash("anything") < 2**63
    assert json.dumps(text_hash("x"))  # plain int


def test_cached_rows_read_across_record_batches_in_the_order_asked(tmp_path, tokenizer, monkeypatch):
    import pickle

    from trainer.data import sources

    monkeypatch.setattr(sources, "JSONL_BLOCK_BYTES", 2048)  # many small record batches
    rows = synthetic_pairs(300, negatives=1)
    table = prepared(tmp_path, str(write_jsonl(tmp_path / "a.jsonl", rows)), tokenizer).tables[0]
    assert len(table.files[0].batch_starts) > 6 and len(table) == 300
    wanted = [299, 0, 150, 0, 17]
    got = cached_rows(table, wanted)
    assert got["query_hash"] == [text_hash(rows[i]["query"]) for i in wanted]
    assert [h[1] for h in got["doc_hash"]] == [text_hash(rows[i]["negative_1"]) for i in wanted]
    assert cached_rows(pickle.loads(pickle.dumps(table)), wanted) == got  # a DataLoader worker maps it again
    with pytest.raises(IndexError):
        cached_rows(table, [300])


# ------------------------------------------------------------------------------ teacher scores


def test_teacher_scores_are_read_and_follow_the_chosen_negatives(tmp_path, tokenizer):
    """A scores list (JSONL) and FlagEmbedding's pos_scores / neg_scores (Parquet) give the same
    cached scores; a batch's teacher_scores are those of the documents it chose, nan where a
    slot was padded with another row's positive."""
    rows, mined = _mined(tmp_path, tokenizer, [4] * 8 + [1] * 8)
    for i, row in enumerate(rows):
        row["scores"] = [10.0 + i] + [float(i + j / 10) for j in range(len(row["negatives"]))]
    scored = prepared(tmp_path, str(write_jsonl(tmp_path / "scored.jsonl", rows)), tokenizer)
    assert scored.has_scores and not mined.has_scores
    flag = [{k: v for k, v in r.items() if k != "scores"} | {"pos_scores": r["scores"][:1], "neg_scores": r["scores"][1:]}
            for r in rows]
    datasets.Dataset.from_list(flag).to_parquet(str(tmp_path / "flag.parquet"))
    from_flag = prepared(tmp_path, str(tmp_path / "flag.parquet"), tokenizer)
    as_float32 = [[float(np.float32(v)) for v in r["scores"]] for r in rows]  # the cache keeps float32
    assert rows_of(scored)["scores"] == rows_of(from_flag)["scores"] == as_float32

    score_of = {(text_hash(r["query"]), text_hash(t)): s for r in rows
                for t, s in zip([r["positive"], *r["negatives"]], r["scores"])}
    batches = GlobalBatches(scored.sizes, 16, seed=2)
    for step in range(3):  # a new choice of negatives each epoch, scores following it
        out = collate(scored, batches.batch_rows(step), tokenizer, num_negatives=2, seed=2)
        teacher = out["teacher_scores"]
        assert teacher.shape == (16, 3) and teacher.dtype == torch.float32
        for i in range(16):
            qh = int(out["query_hashes"][i])
            for j in range(3):
                expected = score_of.get((qh, int(out["doc_hashes"][i, j])))
                if expected is None:  # a padded slot (rows with 1 negative): no teacher score
                    assert j == 2 and torch.isnan(teacher[i, j])
                else:
                    assert float(teacher[i, j]) == pytest.approx(expected, abs=1e-5)  # stored as float32
    assert "teacher_scores" not in collate(mined, batches.batch_rows(0), tokenizer, 1, 2)
