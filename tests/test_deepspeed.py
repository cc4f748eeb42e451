"""DeepSpeed ZeRO 1/2/3 under GradCache (CPU, gloo, 2 ranks): the DDP path's gradients and
parameters, one gradient reduction per step. The config rules are tested in
test_deepspeed_config.py, the trainer end to end (resume, export, accelerate launch) in
test_deepspeed_train.py."""

from __future__ import annotations

import json

import pytest

from tests.tiny import run_torchrun


@pytest.fixture(scope="module")
def zero_results() -> dict[str, dict]:
    """One torchrun for all runs: DeepSpeed's import and set-up dominate the time."""
    output = run_torchrun("gradcache_zero.py", "1", "2", "3", "2-dropout", "2-offload", "3-offload", "1-nocoalesce")
    results = [json.loads(line.removeprefix("RESULT ")) for line in output.splitlines() if line.startswith("RESULT ")]
    return {result["run"]: result for result in results}


# ZeRO 1 and 2 run the DDP path's arithmetic (all-reduce of fp32 sums); ZeRO-3 replaces
# nn.functional.linear by its own autograd function, whose matmul rounds differently.
TOLERANCE = {1: (1e-7, 1e-7), 2: (1e-7, 1e-7), 3: (1e-5, 1e-5)}  # (relative gradient, parameter)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_gradcache_steps_equal_ddp_with_one_reduction_per_step(zero_results, stage):
    result = zero_results[str(stage)]
    grad_tol, param_tol = TOLERANCE[stage]
    assert max(result["grad_diffs"]) <= grad_tol, result
    assert result["param_diff"] <= param_tol, result
    assert result["param_moved"] > 100 * param_tol  # the steps did move the weights
    # 3 + 6 chunks per step, reduced as often as one plain backward: once per bucket, not per chunk.
    assert result["plain_reductions"] > 1
    assert result["cached_reductions"] == [result["plain_reductions"]] * 3, result


@pytest.mark.parametrize("stage, param_tol", [(2, 1e-6), (3, 1e-5)])
def test_zero_with_optimizer_offload_equals_ddp(zero_results, stage, param_tol):
    """DeepSpeed's CPU Adam on offloaded state against torch's AdamW: equal up to rounding (its
    vectorised update rounds differently; ZeRO-3 adds its own matmul rounding)."""
    result = zero_results[f"{stage}-offload"]
    assert max(result["grad_diffs"]) <= 1e-5, result
    assert result["param_diff"] <= param_tol, result
    assert result["cached_reductions"] == [result["plain_reductions"]] * 3, result


def test_zero_replays_dropout_like_ddp(zero_results):
    """Dropout 0.1 on both sides: pass 2 through the engine must redraw pass 1's masks (no
    clipping in this run: DDP's and ZeRO's clipping norms round differently, see the script)."""
    result = zero_results["2-dropout"]
    assert max(result["grad_diffs"]) <= 1e-7, result
    assert result["param_diff"] <= 1e-7, result
    assert result["cached_reductions"] == [result["plain_reductions"]] * 3, result


def test_without_coalescing_zero_reduces_per_chunk_and_drifts(zero_results):
    """The negative control: a cached step without coalesce_grad_reduction gets the engine's
    per-backward reductions, and under ZeRO-1 each chunk's reduction replaces the last one's."""
    result = zero_results["1-nocoalesce"]
    assert result["cached_reductions"][0] == 9 * result["plain_reductions"], result
    assert result["param_diff"] > 1e-4, result
