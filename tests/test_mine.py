"""Hard-negative mining: exclusions, fusion and the false-negative filter against brute force,
every retriever end to end on a tiny model, 2 ranks = 1 rank, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.tiny import (
    REPO,
    WORDS,
    run_python_module,
    subprocess_env,
    synthetic_pairs,
    write_jsonl,
    write_tiny_model,
)
from trainer.tools import configs
from trainer.mining.miner import mine
from trainer.core.embedders import text_embedder
from trainer.core.model import Encoder
from trainer.core.tokenizer import load_tokenizer
from trainer.mining.negatives import choose, draw_keys, drop_excluded, fuse


def test_filter_drops_exactly_the_candidates_above_the_threshold():
    rng = np.random.default_rng(0)
    rows, width, n = 200, 12, 3
    candidates = rng.integers(0, 50, (rows, width))
    candidates[rng.random((rows, width)) < 0.1] = -1
    scores = rng.uniform(-0.2, 0.9, (rows, width))
    positive = rng.uniform(0.2, 0.9, rows)
    for ratio, margin in ((0.95, None), (None, 0.1), (0.9, 0.05)):
        chosen, chosen_scores, dropped = choose(candidates, scores, positive, n, ratio, margin, "top")
        expected_dropped = 0
        for i in range(rows):
            survivors = []
            for c, s in zip(candidates[i], scores[i]):
                if c < 0:
                    continue
                if (ratio is not None and s > ratio * positive[i]) or (margin is not None and s > positive[i] - margin):
                    expected_dropped += 1
                else:
                    survivors.append((c, s))
            if len(survivors) >= n:
                assert chosen[i].tolist() == [c for c, _ in survivors[:n]]
                assert chosen_scores[i].tolist() == [s for _, s in survivors[:n]]
            else:
                assert (chosen[i] == -1).all()
        assert dropped == expected_dropped


def test_random_sampling_picks_survivors_in_rank_order():
    candidates = np.tile(np.arange(10), (50, 1))
    scores = np.tile(np.linspace(0.9, 0.0, 10), (50, 1))  # the first two are above 0.95 x 0.8
    keys = draw_keys(1, np.arange(50), candidates)
    chosen, _, dropped = choose(candidates, scores, np.full(50, 0.8), 4, 0.95, None, "random", keys)
    assert dropped == 100 and (chosen >= 2).all()
    assert all(list(row) == sorted(row) and len(set(row)) == 4 for row in chosen)
    assert len({tuple(row) for row in chosen}) > 10  # really random, not the top 4


def test_exclusions_keep_order_and_fusion_is_reciprocal_rank():
    lists = np.array([[5, 1, 7, 2, -1], [3, 4, 5, 6, 0]])
    excluded = np.array([0 * 10 + 1, 1 * 10 + 5])  # query 0 excludes text 1, query 1 excludes text 5
    assert drop_excluded(lists, np.array([0, 1]), excluded, 10, 4).tolist() == [[5, 7, 2, -1], [3, 4, 6, 0]]
    dense, bm25 = np.array([[9, 2, 4]]), np.array([[2, 7, -1]])  # rank, not id, must order 9, 7, 4
    fused = fuse([dense, bm25], rrf_k=60, keep=4, pool_size=10)
    score = {}
    for ranked in (dense[0], bm25[0]):
        for rank, doc in enumerate(ranked, start=1):
            if doc >= 0:
                score[doc] = score.get(doc, 0) + 1 / (60 + rank)
    assert fused[0].tolist() == sorted(score, key=lambda d: (-score[d], d)) == [2, 9, 7, 4]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    rows = synthetic_pairs(40, seed=4)
    rows[1]["query"] = rows[0]["query"]  # one query, two positives: neither is the other's negative
    rows[2]["positive"] = rows[3]["query"]  # a positive that is another row's query text
    rows[5]["extra"] = {"kept": True}  # fields the trainer ignores pass through
    corpus = [{"_id": f"c{i}", "title": "", "text": " ".join(WORDS[i : i + 6])} for i in range(0, 60, 3)]
    corpus.append({"_id": "dup", "title": "", "text": rows[0]["positive"]})  # a corpus text equal to a positive
    return {
        "root": root,
        "rows": rows,
        "model": write_tiny_model(root / "model"),
        "input": write_jsonl(root / "pairs.jsonl", rows),
        "corpus": write_jsonl(root / "corpus.jsonl", corpus),
    }


def compose_mine(*overrides: str):
    configs.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf" / "tools")):
        return compose(config_name="mine", overrides=list(overrides))


def mine_args(assets, output, *extra):
    return [f"input={assets['input']}", f"output={output}", f"model.name_or_path={assets['model']}",
            f"corpus={assets['corpus']}", "num_negatives=3", "range_max=20", "batch_size=8", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("retriever", ["bm25", "dense", "hybrid"])
def test_no_positive_duplicate_or_query_among_negatives(assets, tmp_path, retriever):
    output = tmp_path / "mined.jsonl"
    summary = mine(compose_mine(*mine_args(assets, output, f"retriever={retriever}", "max_score_ratio=null")))
    mined = read_jsonl(output)
    assert summary["rows_in"] == 40 and summary["rows_out"] == len(mined) > 30
    positives_of = {}
    for row in assets["rows"]:
        positives_of.setdefault(row["query"], set()).add(row["positive"])
    for row in mined:
        assert len(row["negatives"]) == len(row["negative_scores"]) == 3
        assert len(set(row["negatives"])) == 3
        for negative in row["negatives"]:
            assert negative not in positives_of[row["query"]] and negative != row["query"]
    assert next(r for r in mined if r["query"] == assets["rows"][5]["query"])["extra"] == {"kept": True}


def test_dense_mining_equals_brute_force(assets, tmp_path):
    """Rank every pool text by the model's cosine (float64), drop the exclusions, cut at
    range_max, filter at 0.95 x the positive, take the top 3: the tool's output."""
    output = tmp_path / "mined.jsonl"
    summary = mine(compose_mine(*mine_args(assets, output, "retriever=dense", "range_min=1", "max_score_ratio=0.95")))
    rows = assets["rows"]
    pool = list(dict.fromkeys([r["positive"] for r in rows] + [d["text"] for d in read_jsonl(assets["corpus"])]))
    encoder, tokenizer = Encoder.from_pretrained(str(assets["model"])).eval(), load_tokenizer(str(assets["model"]))
    with torch.no_grad():
        q = torch.nn.functional.normalize(text_embedder(encoder, tokenizer, "", 32, torch.device("cpu"))([r["query"] for r in rows]), dim=-1).double()
        d = torch.nn.functional.normalize(text_embedder(encoder, tokenizer, "", 128, torch.device("cpu"))(pool), dim=-1).double()
    cos = (q @ d.T).numpy()
    positives_of = {}
    for r in rows:
        positives_of.setdefault(r["query"], set()).add(r["positive"])
    expected, dropped = [], 0
    for i, r in enumerate(rows):
        ranked = [j for j in np.argsort(-cos[i], kind="stable") if pool[j] not in positives_of[r["query"]] and pool[j] != r["query"]]
        positive = cos[i, pool.index(r["positive"])]
        candidates = ranked[1:20]
        survivors = [j for j in candidates if cos[i, j] <= 0.95 * positive]
        dropped += len(candidates) - len(survivors)
        if len(survivors) >= 3:
            expected.append((r["query"], [pool[j] for j in survivors[:3]], [cos[i, j] for j in survivors[:3]]))
    mined = read_jsonl(output)
    assert [(m["query"], m["negatives"]) for m in mined] == [(q_, n) for q_, n, _ in expected]
    for m, (_, _, scores) in zip(mined, expected):
        np.testing.assert_allclose(m["negative_scores"], scores, atol=1e-5)
    assert summary["dropped_by_filter"] == dropped > 0


def run_mine(assets, output, nproc, *extra):
    env, args = subprocess_env(), mine_args(assets, output, *extra)
    if nproc == 1:
        return run_python_module("trainer.mine", args, cwd=assets["root"], env=env, timeout=300)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, "-m", "trainer.mine", *args], cwd=assets["root"], env=env,
                          capture_output=True, text=True, timeout=300)


def test_two_ranks_mine_what_one_rank_mines(assets, tmp_path):
    import pyarrow.parquet as pq

    outputs = {}
    for nproc in (1, 2):
        output = tmp_path / f"mined-{nproc}.parquet"
        proc = run_mine(assets, output, nproc, "sampling=random", "block_rows=16", f"embeddings_cache={tmp_path / f'cache-{nproc}'}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "dropped by the filter" in proc.stdout
        outputs[nproc] = pq.read_table(output).to_pylist()
    assert [r["negatives"] for r in outputs[1]] == [r["negatives"] for r in outputs[2]]
    np.testing.assert_allclose([r["negative_scores"] for r in outputs[1]], [r["negative_scores"] for r in outputs[2]], atol=1e-6)
    # The cache the 2 ranks wrote together holds every candidate's normalised embedding, in pool order.
    (cached,) = (tmp_path / "cache-2").glob("pool-*.npy")
    pool = list(dict.fromkeys([r["positive"] for r in assets["rows"]] + [d["text"] for d in read_jsonl(assets["corpus"])]))
    encoder, tokenizer = Encoder.from_pretrained(str(assets["model"])).eval(), load_tokenizer(str(assets["model"]))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(text_embedder(encoder, tokenizer, "", 128, torch.device("cpu"))(pool), dim=-1)
    np.testing.assert_allclose(np.load(cached), expected.numpy(), atol=1e-5)


def test_embedding_cache_is_reused_and_changes_nothing(assets, tmp_path, capsys):
    args = mine_args(assets, tmp_path / "cold.jsonl", "retriever=dense", f"embeddings_cache={tmp_path / 'cache'}")
    mine(compose_mine(*args))
    assert "candidate embeddings from" not in capsys.readouterr().out
    mine(compose_mine(*mine_args(assets, tmp_path / "warm.jsonl", "retriever=dense", f"embeddings_cache={tmp_path / 'cache'}")))
    assert "candidate embeddings from" in capsys.readouterr().out
    assert read_jsonl(tmp_path / "cold.jsonl") == read_jsonl(tmp_path / "warm.jsonl")
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_bad_input_and_an_existing_output_are_clear_errors(assets, tmp_path):
    from trainer.data import DataError

    output = tmp_path / "mined.jsonl"
    output.write_text("keep me\n")
    proc = run_mine(assets, output, 1)  # through the command line: one line, exit status 2
    assert proc.returncode == 2 and "exists; pass overwrite=true" in proc.stderr
    assert output.read_text() == "keep me\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "w1 w2", "positive": "w3"}\n{"query": "w4", "positive": 7}\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2: .*positive"):
        mine(compose_mine(*mine_args({**assets, "input": bad}, tmp_path / "out.jsonl")))
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(ValueError, match="fewer than num_negatives"):
        mine(compose_mine(*mine_args(assets, tmp_path / "out.jsonl", "range_max=2")))


def test_mined_output_trains(assets, tmp_path):
    """The output is data.train input as it is: rows, negatives and all."""
    from tests.tiny import run_trainer

    output = tmp_path / "mined.jsonl"
    mine(compose_mine(*mine_args(assets, output)))
    run_dir = tmp_path / "run"
    run_trainer(run_dir, f"model.name_or_path={assets['model']}", f"data.train={output}", "eval.data=null",
                "data.batch_size=8", "trainer.max_steps=2", "data.num_negatives=3", "wandb.mode=disabled")
    assert (run_dir / "model" / "modules.json").exists()


# -- streaming, resuming, the pool on disk ---------------------------------------------------


@pytest.mark.parametrize("retriever", ["bm25", "dense", "hybrid"])
def test_block_streamed_mining_equals_whole_input_mining(assets, tmp_path, retriever):
    """Blocks of 7 rows (a query's rows split over blocks, 6 blocks) against the whole input as one
    block. Scores may differ in the last bits (a query is embedded in another batch, with other
    padding: fp32 rounding of ~1e-7), hence 1e-6; the negatives must not differ at all."""
    outputs = {}
    for block_rows in (7, 1000):
        output = tmp_path / f"mined-{block_rows}.jsonl"
        mine(compose_mine(*mine_args(assets, output, f"retriever={retriever}", f"block_rows={block_rows}",
                                     "sampling=random", "max_score_ratio=null", "margin=-0.05")))
        outputs[block_rows] = read_jsonl(output)
        assert not (tmp_path / f"mined-{block_rows}.jsonl.parts").exists()  # removed once assembled
    assert len(outputs[7]) > 30
    assert [(r["query"], r["negatives"]) for r in outputs[7]] == [(r["query"], r["negatives"]) for r in outputs[1000]]
    np.testing.assert_allclose([r["negative_scores"] for r in outputs[7]], [r["negative_scores"] for r in outputs[1000]],
                               atol=1e-6)


def test_killed_mining_resumes_and_writes_the_uninterrupted_output(assets, tmp_path):
    """SIGKILL in block 2 of 6 (its part written, not yet counted): another command refuses the
    leftover parts, the same command resumes at block 2 (one block redone, on 2 ranks this time)
    and writes the uninterrupted run's bytes (gzip included: no timestamp in its header)."""
    common = ("block_rows=7", "sampling=random", "max_score_ratio=null")
    whole = tmp_path / "whole.jsonl.gz"
    mine(compose_mine(*mine_args(assets, whole, *common)))
    output = tmp_path / "mined.jsonl.gz"
    env = subprocess_env(KILL_AT_BLOCK="2")
    killed = subprocess.run([sys.executable, "-m", "tests.dist_scripts.killed_mine", *mine_args(assets, output, *common)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    parts = tmp_path / "mined.jsonl.gz.parts"
    assert not output.exists() and (parts / "part-000002.jsonl").exists()
    assert sorted(json.loads((parts / "manifest.json").read_text())["done"]) == ["0", "1"]

    other = run_mine(assets, output, 1, *common, "num_negatives=2")
    assert other.returncode == 2 and "other settings (settings differ)" in other.stderr
    resumed = run_mine(assets, output, 2, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "6 block(s) of 7 rows; resuming: 2 done" in resumed.stdout
    assert output.read_bytes() == whole.read_bytes()
    assert not parts.exists()


def test_pool_files_equal_the_in_memory_pool(assets, tmp_path):
    """trainer.mining.pool.build against the plain computation: the pool (positives then corpus, each text
    once, first seen first), every row's query and positive id, and the excluded pairs."""
    from trainer.data import Columns
    from trainer.mining.pool import MiningInput, build

    build(tmp_path, str(assets["input"]), Columns(), str(assets["corpus"]))
    data = MiningInput.open(tmp_path)
    rows = assets["rows"]
    pool = list(dict.fromkeys([r["positive"] for r in rows] + [d["text"] for d in read_jsonl(assets["corpus"])]))
    queries = list(dict.fromkeys(r["query"] for r in rows))
    assert data.pool.take(np.arange(len(pool))) == pool and data.pool_size == len(pool) < len(rows) + 21
    assert data.queries.take(np.arange(len(queries))) == queries
    assert data.row_query[:].tolist() == [queries.index(r["query"]) for r in rows]
    assert data.row_positive[:].tolist() == [pool.index(r["positive"]) for r in rows]
    expected = {(queries.index(r["query"]), pool.index(r["positive"])) for r in rows}
    expected |= {(q, pool.index(text)) for q, text in enumerate(queries) if text in pool}
    assert sorted(expected) == [(k // len(pool), k % len(pool)) for k in data.excluded[:]]
    some = np.array([0, 3, 7])
    assert data.excluded_of(some).tolist() == [k for k in data.excluded[:].tolist() if k // len(pool) in some]
    # The row arrays are read through a map per read: a map kept for the run would leave every page
    # read in RSS (O(rows) by the last block). Linux lists a process's live maps in /proc/self/maps.
    # Only the .npy files are checked: pyarrow unmaps an Arrow file when its last buffer goes, which
    # a clean CI run showed can outlive the read (the text store's pages are measured by
    # bench/mine_scale.py instead: a 49K-id take holds ~8 MB of them).
    kept = data.row_query[2:5], data.excluded_of(some)  # results outlive their reads
    live_maps = Path("/proc/self/maps").read_text()
    assert len(kept[0]) == 3
    assert not [f for f in tmp_path.glob("*.npy") if str(f) in live_maps]


@pytest.mark.parametrize("reads_per_map", [2048, 2])  # one map per read; the file mapped anew after 2 texts
def test_text_store_reads_any_ids_across_batches(tmp_path, monkeypatch, reads_per_map):
    from trainer.retrieval import text_store
    from trainer.retrieval.text_store import TextStore, write_texts

    monkeypatch.setattr(text_store, "READS_PER_MAP", reads_per_map)
    texts = [f"t{i} " + "é" * (i % 5) for i in range(25)]
    assert write_texts(tmp_path / "t.arrow", [texts[:10], [], texts[10:17], texts[17:]]) == 25
    store = TextStore(tmp_path / "t.arrow")
    ids = np.array([24, 0, 9, 10, 16, 17, 3, 3, 11])
    assert len(store) == 25 and store.take(ids) == [texts[i] for i in ids] and store[16] == texts[16]
    assert store.lengths().tolist() == [len(t) for t in texts]
    assert [t for batch in store.batches() for t in batch] == texts
    with pytest.raises(IndexError):
        store.take([25])


# -- approximate search ----------------------------------------------------------------------


def test_faiss_shard_search_and_its_recall_against_brute_force():
    """An IVF index probing 1 of 8 clusters misses some true neighbours; recall() counts them as a
    plain set comparison with brute-force top-k does; probing all 8 clusters is exhaustive
    (recall exactly 1); ids are the shard's pool ids."""
    pytest.importorskip("faiss")  # an optional extra; the test extra installs it, so CI runs this
    from trainer.retrieval.ann import ShardANN, recall

    rng = np.random.default_rng(0)
    docs = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(2000, 16)).astype(np.float32)), dim=-1)
    queries = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(100, 16)).astype(np.float32)), dim=-1)
    pool_ids = np.arange(2000) * 3 + 7  # a shard's ids are not 0..n-1
    exact = pool_ids[(queries @ docs.T).topk(10, dim=1).indices.numpy()]
    for nprobe in (1, 8):
        _, ids = ShardANN(docs, pool_ids, "IVF8,Flat", nprobe, 0).search(queries, 10)
        ids = ids.numpy()
        expected_hits = sum(len(set(a) & set(e)) for a, e in zip(ids.tolist(), exact.tolist()))
        assert recall(ids, exact) == (expected_hits, 1000)
        if nprobe == 8:
            assert expected_hits == 1000
        else:
            # Approximate, and measured as such: fewer than all, more than the eighth of the true
            # neighbours a cluster chosen at random would hold (the nearest cluster is not random).
            assert 1000 / 8 < expected_hits < 1000
    with pytest.raises(ValueError, match="faiss_index=IVF4096,Flat"):
        ShardANN(docs, pool_ids, "IVF4096,Flat", 1, 0)  # more clusters than vectors: one clear line


def test_faiss_mining_reports_recall_and_matches_exact_when_exhaustive(assets, tmp_path, capsys):
    pytest.importorskip("faiss")
    common = ("retriever=dense", "max_score_ratio=null")
    mine(compose_mine(*mine_args(assets, tmp_path / "exact.jsonl", *common)))
    # HNSW with a search list longer than the tiny pool visits every text: recall 1, same output.
    summary = mine(compose_mine(*mine_args(assets, tmp_path / "hnsw.jsonl", *common, "search=faiss")))
    assert summary["faiss_recall"] == 1.0
    assert read_jsonl(tmp_path / "hnsw.jsonl") == read_jsonl(tmp_path / "exact.jsonl")
    summary = mine(compose_mine(*mine_args(assets, tmp_path / "ivf.jsonl", *common, "search=faiss",
                                           "faiss_index='IVF8,Flat'", "faiss_nprobe=1")))
    assert 0 < summary["faiss_recall"] < 1
    assert "faiss (IVF8,Flat) recall@" in capsys.readouterr().out


def test_fp16_pool_scores_within_fp16_rounding_of_fp32(assets, tmp_path):
    """pool_dtype=fp16 (the default on a GPU) holds the shard in half precision: each cosine of
    unit vectors is then off by at most a few fp16 ulps at 1.0 (2^-10 ~ 1e-3), hence 4e-3."""
    common = ("retriever=dense", "max_score_ratio=null", "margin=-1.0")
    mine(compose_mine(*mine_args(assets, tmp_path / "fp32.jsonl", *common)))
    mine(compose_mine(*mine_args(assets, tmp_path / "fp16.jsonl", *common, "pool_dtype=fp16")))
    fp32 = {r["query"] + r["positive"]: r for r in read_jsonl(tmp_path / "fp32.jsonl")}
    fp16 = read_jsonl(tmp_path / "fp16.jsonl")
    assert len(fp16) == len(fp32) == 40  # margin -1 keeps every candidate: every row is written
    for row in fp16:
        np.testing.assert_allclose(row["negative_scores"], fp32[row["query"] + row["positive"]]["negative_scores"],
                                   atol=4e-3)


def test_a_second_live_run_of_the_same_output_is_refused(assets, tmp_path):
    """Another process mining the same output holds its lock (flock): this run stops with one
    line before touching the parts, which the other would otherwise lose."""
    import fcntl

    output = tmp_path / "mined.jsonl"
    with open(tmp_path / "mined.jsonl.parts.lock", "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another mining run of this output is still running"):
            mine(compose_mine(*mine_args(assets, output)))
        fcntl.flock(other, fcntl.LOCK_UN)
    mine(compose_mine(*mine_args(assets, output)))  # free again: it runs, and cleans up after itself
    assert output.exists() and not list(tmp_path.glob("mined.jsonl.parts*"))
