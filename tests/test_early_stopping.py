"""Early stopping: the plateau rule by hand, and the trainer end to end: it stops, its model/ is
the best evaluation's weights, and a stop-and-resume decides exactly as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import run_trainer, synthetic_pairs, write_beir, write_jsonl, write_tiny_model
from trainer.run.early_stopping import EarlyStopping


def test_plateau_rule_by_hand():
    rule = EarlyStopping(metric="ndcg@10", patience=2, min_delta=0.01)
    history = [0.50, 0.505, 0.52, 0.525, 0.529]
    decisions = [(rule.update(step, {"ndcg@10": v}), rule.should_stop) for step, v in enumerate(history)]
    # 0.505 is within min_delta of 0.50; 0.52 beats it; then two evaluations without a real gain.
    assert decisions == [(True, False), (False, False), (True, False), (False, False), (False, True)]
    assert (rule.best, rule.best_step) == (0.52, 2)
    restored = EarlyStopping(metric="ndcg@10", patience=2, min_delta=0.01)
    restored.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert restored.state_dict() == rule.state_dict()


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="metric must be one of"):
        EarlyStopping(metric="loss")
    with pytest.raises(ValueError, match="patience must be at least 1"):
        EarlyStopping(patience=0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {
        "model": write_tiny_model(root / "model"),
        "train": write_jsonl(root / "train.jsonl", synthetic_pairs(48, seed=1)),
        "dev": write_beir(root / "dev", synthetic_pairs(20, seed=2)),
    }


def overrides(assets, *extra):
    return [
        f"model.name_or_path={assets['model']}", f"data.train={assets['train']}", f"eval.data={assets['dev']}",
        "model.dropout=0.0", "trainer.lr=1e-3", "trainer.warmup_steps=1", "data.batch_size=16",
        "trainer.max_steps=20", "eval.every=1", "trainer.early_stopping.patience=3",
        "trainer.early_stopping.min_delta=0.01", "checkpoint.every=1", "checkpoint.keep=100", *extra,
    ]


def evals(run_dir):
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stopped_run(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    proc = run_trainer(run_dir, *overrides(assets))
    return run_dir, proc.stdout + proc.stderr


def test_stops_on_a_plateau_and_exports_the_best_step(stopped_run):
    run_dir, output = stopped_run
    curve = evals(run_dir)
    best = json.loads((run_dir / "best.json").read_text())
    # The rule, replayed on the logged curve, says where the run had to stop and which step won.
    rule = EarlyStopping(metric="ndcg@10", patience=3, min_delta=0.01)
    for e in curve:
        rule.update(e["step"], e)
        if rule.should_stop:
            break
    assert rule.should_stop and e["step"] == curve[-1]["step"] < 20, "the run did not stop where the rule says"
    assert best["step"] == rule.best_step > 0 and best["value"] == rule.best
    assert f"stopped early after step {curve[-1]['step']}" in output
    # model/ holds the weights of the best step's checkpoint, not the last one's.
    # (The pooler, which training never uses, is no part of the checkpoints: the base model's.)
    exported = {k: v for k, v in load_file(run_dir / "model" / "model.safetensors").items() if not k.startswith("pooler.")}
    at_best = torch.load(run_dir / "checkpoints" / f"step-{best['step']}" / "model.pt")
    at_last = torch.load(run_dir / "checkpoints" / f"step-{curve[-1]['step']}" / "model.pt")
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, at_best[f"backbone.{name}"], rtol=0, atol=0)
    assert any(not torch.equal(t, at_last[f"backbone.{n}"]) for n, t in exported.items())
    assert not (run_dir / "best-model").exists()


def test_stop_and_resume_decides_as_the_uninterrupted_run(assets, stopped_run, tmp_path):
    run_dir, _ = stopped_run
    resumed = tmp_path / "run"
    run_trainer(resumed, *overrides(assets, "trainer.stop_after_step=9"))
    assert not (resumed / "model").exists()
    output = run_trainer(resumed, *overrides(assets)).stdout
    assert [(e["step"], e["ndcg@10"]) for e in evals(resumed)] == [(e["step"], e["ndcg@10"]) for e in evals(run_dir)]
    assert json.loads((resumed / "best.json").read_text()) == json.loads((run_dir / "best.json").read_text())
    a, b = load_file(run_dir / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    again = run_trainer(resumed, *overrides(assets)).stdout
    assert "already complete" in again and "stopped early" in again, output


def test_early_stopping_without_an_eval_curve_is_refused():
    from tests.test_config import compose_config
    from trainer.run.build import _early_stopping

    with pytest.raises(ValueError, match="trainer.early_stopping needs an evaluation curve"):
        _early_stopping(compose_config("trainer.early_stopping.patience=2"))  # eval.every is 0
    assert _early_stopping(compose_config()) is None
    assert _early_stopping(compose_config("trainer.early_stopping.patience=2", "eval.every=5")).patience == 2
