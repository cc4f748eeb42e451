"""`python -m trainer.check` (trainer/tools/check/): the clean code passes on 1 and 2 gloo ranks,
under DDP and ZeRO 1-3, and each mutation of the gather, the gathered layout and the reduction
(patched in by tests/dist_scripts/check_mutants.py, never a user option) is caught and named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.tiny import REPO, run_python_module, subprocess_env, synthetic_pairs, write_beir, write_jsonl, write_tiny_model

SCRIPT = str(REPO / "tests" / "dist_scripts" / "check_mutants.py")
MUTANTS = {  # mutation -> words its failure line must hold
    "gather-drops-gradient": "the gather drops the gradient",
    "gather-scaled": "the gather has a stray factor",
    "negatives-misordered": "hard-negative columns are out of order",
    "reduce-per-chunk": "reduced gradients",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("check-assets")
    return {
        # Dropout on in the model: the replay check then has masks to redraw.
        "model": write_tiny_model(root / "model", dropout=0.1),
        "train": write_jsonl(root / "train.jsonl", synthetic_pairs(48, seed=1, negatives=2)),
        "dev": write_beir(root / "dev", synthetic_pairs(20, seed=2)),
        "root": root,
    }


def overrides(assets, *extra: str) -> list[str]:
    return [f"model.name_or_path={assets['model']}", f"data.train={assets['train']}", f"eval.data={assets['dev']}",
            "data.batch_size=8", "trainer.max_steps=4", "eval.every=2", "wandb.mode=disabled",
            f"data.cache_dir={assets['root'] / 'cache'}", *extra]


def run_mutants(entries: list[dict], nproc: int, cwd) -> dict[str, list[dict]]:
    """Each entry's check report (rank 0's), by mutation: 2 ranks under torchrun, 1 rank in the
    session's warm interpreter."""
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT]
        proc = subprocess.run([*launcher, json.dumps(entries)], cwd=cwd, env=subprocess_env(PYTHONPATH=str(REPO)),
                              capture_output=True, text=True, timeout=600)
    else:
        proc = run_python_module("tests.dist_scripts.check_mutants", [json.dumps(entries)], cwd=cwd, env=subprocess_env(),
                                 timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results: dict[str, list[dict]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CHECK "):
            result = json.loads(line.removeprefix("CHECK "))
            results.setdefault(result["mutation"], []).append(result)
    return results


def assert_caught(result: dict, words: str) -> None:
    assert not result["ok"], f"{result['mutation']} passed the check: {result['exactness']}"
    assert any(words in line for line in result["failures"]), result["failures"]


def test_two_ranks_pass_clean_under_ddp_and_zero_1_2_3_and_catch_every_mutation(assets, tmp_path):
    zero = [{"mutation": "none", "overrides": overrides(assets, "trainer.backend=deepspeed", f"deepspeed.zero_stage={s}")}
            for s in (1, 2, 3)]
    entries = [{"mutation": m, "overrides": overrides(assets)} for m in ["none", *MUTANTS]] + zero
    results = run_mutants(entries, nproc=2, cwd=tmp_path)
    clean, *zero_runs = results["none"]
    assert clean["ok"], clean["failures"]
    figures = clean["exactness"]
    # The factor is a sum of 2 equal fp32 terms divided by one of them: exact but for one rounding
    # (pytest.approx's 1e-6 relative is 8 float32 ulps).
    assert figures["chunks_re-embedded"] >= 4 and figures["gather_gradient_factor"] == pytest.approx(2.0)
    assert figures["reductions"]["plain"] >= 1  # DDP reduced, and as often chunked as plain
    assert figures["replay_dropout"]
    assert [r["backend"].split(";")[0] for r in zero_runs] == [f"deepspeed ZeRO-{s}" for s in (1, 2, 3)]
    for result in zero_runs:
        assert result["ok"], (result["backend"], result["failures"])
        assert result["exactness"]["reductions"]["plain"] >= 1
    for mutation, words in MUTANTS.items():
        assert_caught(results[mutation][0], words)
    # The gather's mutations move the gradient itself, far past the tolerance; the layout's moves
    # the reference too (both sides lay out the batch with the loss's one function): the layout
    # check is what sees it.
    for mutation in ("gather-drops-gradient", "gather-scaled"):
        assert any("differ from the reference" in line for line in results[mutation][0]["failures"]), mutation
    assert all(line.startswith("every rank: ") for r in results.values() for line in r[0]["failures"])
    assert list(tmp_path.iterdir()) == []  # the check wrote nothing where it ran


def test_one_rank_passes_clean_and_catches_what_one_rank_can_show(assets, tmp_path):
    """On one rank the gather is the identity: its two mutations change nothing there, so the check
    passes them (rightly); the layout's mutation and a clean run behave as on two ranks."""
    entries = [{"mutation": m, "overrides": overrides(assets)} for m in ("none", "negatives-misordered", "gather-scaled")]
    results = run_mutants(entries, nproc=1, cwd=tmp_path)
    assert results["none"][0]["ok"], results["none"][0]["failures"]
    assert_caught(results["negatives-misordered"][0], MUTANTS["negatives-misordered"])
    assert results["gather-scaled"][0]["ok"]


def test_the_command_prints_a_table_writes_check_json_and_fails_in_one_line(assets, tmp_path):
    out = tmp_path / "report" / "check.json"
    out.parent.mkdir()
    args = [*overrides(assets), f"check.output={out}", "hydra.run.dir=ignored"]
    proc = run_python_module("trainer.check", args, cwd=tmp_path, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: the gather, the chunking and the reduction are exact here" in proc.stdout
    report = json.loads(out.read_text())
    assert report["ok"] and report["world_size"] == 1 and report["cost"]["pairs_per_s"] > 0
    assert report["cost"]["projected_s"] > 0 and report["cost"]["evaluations"] == 3  # step 0, step 2, the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no run folder, no outputs/
    bad = run_python_module("trainer.check", [*overrides(assets), "check.rowz=2"], cwd=tmp_path, env=subprocess_env(),
                            timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "check.rowz=2: unknown check setting" in bad.stderr
