"""The Hydra app end to end, on a tiny random BERT: outputs, GradCache on/off, world-size
invariance, resume, bad input, and the saved model in sentence-transformers."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import (
    assert_sentence_transformers_matches_encoder, run_trainer, subprocess_env, synthetic_pairs, write_beir, write_jsonl,
    write_tiny_model,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    rows = synthetic_pairs(48, seed=1)
    return {
        "model": write_tiny_model(root / "model"),
        "train": write_jsonl(root / "train.jsonl", rows),
        "dev": write_beir(root / "dev", synthetic_pairs(20, seed=2)),
        "root": root,
    }


def common(assets, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={assets['model']}",
        f"data.train={assets['train']}",  # a plain path, as everyone types it first
        f"eval.data={assets['dev']}",
        "model.dropout=0.0",
        "trainer.lr=1e-3",
        "trainer.warmup_steps=1",
        *extra,
    ]


def metrics_of(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    return metrics_of(run_dir)


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir)]


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    """6 uninterrupted steps, global batch 16, GradCache off."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run_trainer(run_dir, *common(assets, "data.batch_size=16", "trainer.max_steps=6", "trainer.health_every=3"))
    return run_dir


def test_cli_run_writes_every_output(full_run):
    records = metrics(full_run)
    assert [m["step"] for m in records] == list(range(1, 7))
    for key in ("step", "epoch", "loss", "lr", "temperature", "pairs_per_s", "tokens_per_s", "padding", "accuracy",
                "pos_sim", "neg_sim", "emb_std"):
        assert all(key in m for m in records), key
    # A plain step packs each side: every computed token is real. A pair holds at least 4 tokens
    # ([CLS] and [SEP] twice) and its words. No device peak on a CPU: no mfu.
    assert all(m["padding"] == 0.0 and m["tokens_per_s"] > 4 * m["pairs_per_s"] for m in records), records[0]
    assert not any("mfu" in m for m in records)
    assert {"alignment", "uniformity", "loss_infonce", "loss_symmetric", "loss_gte"} <= records[2].keys()
    assert records[0]["lr"] == 0.0 and records[1]["lr"] == pytest.approx(1e-3)  # one warm-up step, then decay
    evals = [json.loads(line) for line in (full_run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 6]
    assert {"ndcg@10", "recall@10", "mrr@10"} <= evals[0].keys()
    assert (full_run / "checkpoints" / "step-6" / "model.pt").exists()
    assert not list((full_run / "checkpoints").glob("*.tmp"))
    assert (full_run / "model" / "modules.json").exists()
    assert (full_run / ".hydra" / "config.yaml").exists()
    assert list((full_run / "wandb").glob("offline-run-*"))
    assert losses(full_run)[-1] < losses(full_run)[0]  # it learns


def test_gradcache_on_and_off_give_the_same_losses(assets, full_run, tmp_path):
    run_dir = tmp_path / "cached"
    run_trainer(run_dir, *common(assets, "data.batch_size=16", "trainer.max_steps=6", "grad_cache.chunk_size=3"))
    torch.testing.assert_close(losses(run_dir)[:5], losses(full_run)[:5], atol=1e-5, rtol=0)


def test_two_ranks_of_8_give_the_losses_of_one_rank_of_16(assets, full_run, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_trainer(run_dir, *common(assets, "data.batch_size=16", "trainer.max_steps=6", "wandb.mode=disabled"), nproc=2)
    torch.testing.assert_close(losses(run_dir)[:5], losses(full_run)[:5], atol=1e-5, rtol=0)
    # One run dir for both ranks, Hydra's files written once.
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["ddp"]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert proc.stdout.count("NDCG@10 before") == 1  # rank 0 speaks, the other rank is quiet


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(assets, tmp_path, precision):
    run_dir = tmp_path / precision
    run_trainer(run_dir, *common(assets, "data.batch_size=16", "trainer.max_steps=2", "grad_cache.chunk_size=5",
                                 f"trainer.precision={precision}", "wandb.mode=disabled", "eval.data=null"))
    assert all(math.isfinite(loss) for loss in losses(run_dir)) and len(losses(run_dir)) == 2


def test_interrupted_and_resumed_run_equals_uninterrupted_run(assets, full_run, tmp_path):
    run_dir = tmp_path / "resumed"
    args = common(assets, "data.batch_size=16", "trainer.max_steps=6", "trainer.health_every=3")
    first = run_trainer(run_dir, *args, "trainer.stop_after_step=3")
    assert "stopped after step 3" in first.stdout
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3]
    assert not (run_dir / "model").exists()
    wandb_id = json.loads((run_dir / "wandb.json").read_text())["id"]

    second = run_trainer(run_dir, *args)
    assert "resuming from" in second.stdout
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 7))
    torch.testing.assert_close(losses(run_dir), losses(full_run), atol=1e-6, rtol=0)
    resumed = load_file(run_dir / "model" / "model.safetensors")
    uninterrupted = load_file(full_run / "model" / "model.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0)
    assert json.loads((run_dir / "wandb.json").read_text())["id"] == wandb_id  # the same W&B run continues
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # two sessions of one run id
    assert all(p.name.endswith(wandb_id) for p in (run_dir / "wandb").glob("offline-run-*"))

    third = run_trainer(run_dir, *args)  # a finished run is left as it is
    assert "already complete" in third.stdout

    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn again after the resume
    both = subprocess.run([sys.executable, "-m", "trainer.plot", str(full_run), str(run_dir), "--out", str(tmp_path / "both.png")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert both.returncode == 0 and (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", both.stderr
    from trainer.run.curves import labels_for

    # The resumed run was last started with full_run's very overrides: their folders tell them apart.
    assert labels_for([full_run, run_dir]) == ["run", "resumed"]


def test_multirun_sweep_shares_a_wandb_group_and_summarises(assets, tmp_path):
    sweep = tmp_path / "my-sweep"
    run_trainer(sweep, *common(assets, "trainer.max_steps=2", "wandb.mode=offline"),
                "loss.temperature=0.05,0.1", "data.batch_size=8,16", multirun=True)
    points = sorted((metrics(sweep / str(n))[-1]["temperature"], n) for n in range(4))
    assert [t for t, _ in points] == [0.05, 0.05, 0.1, 0.1]
    for n in range(4):
        assert json.loads((sweep / str(n) / "wandb.json").read_text())["group"] == "my-sweep"

    proc = subprocess.run([sys.executable, "-m", "trainer.summary", str(sweep)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["loss.temperature"], r["data.batch_size"]) for r in rows) == [
        ("0.05", "16"), ("0.05", "8"), ("0.1", "16"), ("0.1", "8")
    ]
    for row in rows:  # each row carries that run's final eval
        final = json.loads((sweep / row["run"] / "eval.jsonl").read_text().splitlines()[-1])
        assert float(row["ndcg@10"]) == pytest.approx(final["ndcg@10"])
        assert float(row["final_loss"]) == pytest.approx(metrics(sweep / row["run"])[-1]["loss"])
    assert len({row["final_loss"] for row in rows}) > 1  # the points differ, so a mix-up would show
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss.temperature" in proc.stdout and "ndcg@10" in proc.stdout


def test_saved_model_loads_in_sentence_transformers_with_the_same_embeddings(full_run):
    from transformers import AutoModel

    assert_sentence_transformers_matches_encoder(full_run / "model")
    assert AutoModel.from_pretrained(str(full_run / "model")).config.hidden_size == 32


def test_export_keeps_every_weight_and_has_a_card_that_states_the_runs_figures(full_run):
    from transformers import AutoModel

    from tests.tiny import read_metadata
    from trainer.run.model_card import metric_id

    model = full_run / "model"
    _, info = AutoModel.from_pretrained(str(model), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()  # the pooler came along
    meta = read_metadata(model / "README.md")
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert "base_model" not in meta  # a local folder is no hub id
    assert "dataset_size:48" in meta["tags"]
    kept = [e for e in metrics_of(full_run, "eval.jsonl") if e["step"] == 6][0]
    stated = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert stated == {metric_id(k): v for k, v in kept.items() if k != "step"}  # exactly, as YAML round-trips floats
    body = (model / "README.md").read_text()
    before = metrics_of(full_run, "eval.jsonl")[0]
    assert f"| ndcg@10 | {before['ndcg@10']:.4f} | {kept['ndcg@10']:.4f} |" in body
    assert "| global batch | 16 pairs (1 rank(s) x 16)" in body and "| steps | 6 |" in body
    assert "python -m trainer model.name_or_path=" in body and "trainer.max_steps=6" in body
    # The base (a tiny test model) states no sentence-transformers length and a tokenizer limit of
    # 64, so the export reads as far as training did: the longer of 64 and doc_max_length 128.
    assert json.loads((model / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    assert (full_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_length_is_the_longer_of_the_base_models_and_trainings(tmp_path):
    from omegaconf import OmegaConf

    from trainer.core.tokenizer import load_tokenizer
    from trainer.run.build import export_length

    base = write_tiny_model(tmp_path / "base")
    tokenizer = load_tokenizer(str(base))
    model_cfg = OmegaConf.create({"name_or_path": str(base), "query_max_length": 16, "doc_max_length": 48,
                                  "export_max_length": None})
    assert export_length(model_cfg, tokenizer) == 64  # the tokenizer's limit beats training's 48
    (base / "sentence_bert_config.json").write_text('{"max_seq_length": 256}')
    assert export_length(model_cfg, tokenizer) == 256  # a sentence-transformers base says its own
    model_cfg.export_max_length = 100
    assert export_length(model_cfg, tokenizer) == 100


def test_own_data_outside_the_repository_is_not_scored_on_the_demo_and_ddp_never_imports_deepspeed(assets, tmp_path):
    """eval.data=auto evaluates only the demo's data; a DDP run (here one process, with DeepSpeed
    installed) imports no deepspeed, whose import prints an accelerator warning."""
    script = (
        "import sys; from trainer.__main__ import main; "
        f"sys.argv = ['trainer', 'hydra.run.dir={tmp_path / 'run'}', 'model.name_or_path={assets['model']}', "
        f"'data.train={assets['train']}', 'data.batch_size=16', 'trainer.max_steps=2', 'wandb.mode=disabled']; "
        "main(); print('deepspeed imported:', 'deepspeed' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed imported: False" in proc.stdout
    assert "eval.data=auto: no evaluation" in proc.stdout
    assert not (tmp_path / "run" / "eval.jsonl").exists() and (tmp_path / "run" / "model" / "README.md").exists()
    assert "Not evaluated during training" in (tmp_path / "run" / "model" / "README.md").read_text()


def test_bad_input_is_one_clear_error_before_anything_is_written(assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "w1", "positive": "w2 w3"}\n{"query": "w4", "positive": ""}\n')
    run_dir = tmp_path / "existing-run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    proc = run_trainer(run_dir, *common(assets, f"data.train={bad}"), expect_ok=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: line 2: field 'positive' is empty"]
    assert "Traceback" not in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # nothing written over
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize(
    "override,message",
    [("loss.temprature=0.1", "temprature"), ("trainer.lr=fast", "trainer.lr"), ("model.pooling=max", "model.pooling")],
)
def test_config_mistakes_fail_at_composition(assets, tmp_path, override, message):
    proc = run_trainer(tmp_path / "run", *common(assets, override), expect_ok=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_global_batch_that_does_not_split_over_ranks_is_a_clear_error(assets, tmp_path):
    proc = run_trainer(tmp_path / "run", *common(assets, "data.batch_size=15"), nproc=2, expect_ok=False)
    assert proc.returncode != 0
    assert "error: data.batch_size=15 is the global batch and must divide evenly over 2 ranks" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_summary_of_runs_without_evaluation_plots_the_final_loss(tmp_path):
    for n, (temperature, loss) in enumerate([(0.05, 2.0), (0.1, 1.5)]):
        run = tmp_path / str(n)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- loss.temperature={temperature}\n")
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": loss}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "trainer.summary", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "the heatmap shows final_loss" in proc.stdout
    with open(tmp_path / "summary.csv", newline="") as handle:
        assert [float(r["final_loss"]) for r in csv.DictReader(handle)] == [2.0, 1.5]
    assert (tmp_path / "summary.png").exists()


def test_two_sources_same_source_batches_world_size_invariance_and_resume(assets, tmp_path):
    """Two weighted sources: every step names its one source; 2 ranks and an interrupted run
    give the losses of one uninterrupted rank."""
    other = write_jsonl(assets["root"] / "other.jsonl", synthetic_pairs(40, seed=9))
    spec = f"data.train={{main: {assets['train']}, other: {{path: {other}, weight: 3}}}}"
    args = common(assets, spec, "data.batch_size=8", "trainer.max_steps=6", "wandb.mode=disabled", "eval.data=null")
    single = tmp_path / "single"
    proc = run_trainer(single, *args)
    assert "88 training pairs in 2 sources" in proc.stdout
    records = metrics(single)
    assert {r["source"] for r in records} == {"main", "other"}
    for r in records:
        assert r[f"loss/{r['source']}"] == r["loss"]
    last = records[-1]
    assert last["rows_seen/main"] + last["rows_seen/other"] == 6 * 8
    assert last["rows_seen/other"] == 8 * sum(r["source"] == "other" for r in records)

    ranks = tmp_path / "ranks"
    run_trainer(ranks, *args, nproc=2)
    torch.testing.assert_close(losses(ranks)[:5], losses(single)[:5], atol=1e-5, rtol=0)
    assert [r["source"] for r in metrics(ranks)] == [r["source"] for r in records]

    resumed = tmp_path / "resumed"
    run_trainer(resumed, *args, "trainer.stop_after_step=3")
    run_trainer(resumed, *args)
    torch.testing.assert_close(losses(resumed), losses(single), atol=1e-6, rtol=0)


def test_matryoshka_run_reports_each_size_and_records_them_in_the_export(assets, tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *common(assets, "data.batch_size=16", "trainer.max_steps=2", "wandb.mode=disabled",
                                 "loss.matryoshka_dims=[32,16,8]", "loss.matryoshka_weights=[1,1,0.5]"))
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    for e in evals:
        assert {"ndcg@10", "ndcg@10/dim16", "ndcg@10/dim8", "recall@10/dim8", "mrr@10/dim16"} <= e.keys()
        assert "ndcg@10/dim32" not in e  # the full size is the plain figure
    config = json.loads((run_dir / "model" / "config_sentence_transformers.json").read_text())
    assert config["matryoshka_dims"] == [32, 16, 8]

    from sentence_transformers import SentenceTransformer

    texts = ["w1 w2 w3", "w7 w8 w9 w10 w11 w12"]
    full = torch.tensor(SentenceTransformer(str(run_dir / "model"), device="cpu").encode(texts))
    small = torch.tensor(SentenceTransformer(str(run_dir / "model"), device="cpu", truncate_dim=8).encode(texts))
    torch.testing.assert_close(torch.nn.functional.normalize(small, dim=-1),
                               torch.nn.functional.normalize(full[:, :8], dim=-1), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_run_has_the_losses_of_the_plain_run(assets, full_run, tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *common(assets, "data.batch_size=16", "trainer.max_steps=6", "trainer.health_every=3",
                                 "model.gradient_checkpointing=true", "eval.data=null", "wandb.mode=disabled"))
    torch.testing.assert_close(losses(run_dir), losses(full_run), atol=1e-6, rtol=0)
