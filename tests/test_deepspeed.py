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


# How close ZeRO must stay to DDP, and why.
#
# Step 1 (before any update): ZeRO 1 and 2 run the DDP path's arithmetic. The same chunks give the
# same per-chunk gradients, accumulated in the same order, and the two ranks' sums are reduced
# and halved (a sum of two and a division by 2 round the same in any order). So the gradients
# are equal bit for bit. A missing or doubled reduction changes them by a relative 0.5 to 1.
#
# After updates: AdamW in DeepSpeed's flattened partitions (or its CPU Adam) rounds the update in
# kernels of its own. It may round the decayed weight and the stepped weight each one float32
# ulp away from torch's, so at most 2 ulp of a weight per update. The script's rounding control
# is DDP itself with every weight nudged one ulp, random up or down, after every update. It
# measures what such roundings do to this model's later gradients and weights (1e-6 relative
# and 4e-7 here; the same on AVX2 and AVX-512 CPUs). ZeRO must stay within 4x the control:
# 2x for two roundings per update where the control makes one, and 2x because the control's
# random signs partly cancel where a kernel's roundings need not.
CONTROL_FACTOR = 4

# ZeRO-3 also replaces nn.functional.linear by its own autograd function, whose matmuls
# accumulate in another order from step 1 on. An fp32 dot product of length K differs by at most
# about K * 2**-24 relative between two orders: about 4e-6 for this model's K <= 64. So the bound
# is 1e-5 relative to the largest gradient entry, at every step. Weights get 1e-5 absolute
# (1% of one update at lr 1e-3; 2.3e-6 here): Adam passes a gradient's rounding difference to
# the weight almost whole where that gradient is itself rounding noise (attention key biases).
ZERO3_TOLERANCE = 1e-5


def assert_within_rounding(result: dict, exact_first_step: bool = True) -> None:
    grads, control = result["grad_diffs"], result["control_grad_diffs"]
    if exact_first_step:
        assert grads[0] == 0.0, result
        for step in range(1, len(grads)):
            assert grads[step] <= CONTROL_FACTOR * control[step], (step, result)
        assert result["param_diff"] <= CONTROL_FACTOR * result["control_param_diff"], result
    else:
        assert max(grads) <= ZERO3_TOLERANCE, result
        assert result["param_diff"] <= ZERO3_TOLERANCE, result
    # The control is rounding-sized, so the bound cannot hide a real difference: a missing or
    # doubled reduction moves gradients by a relative 0.5 to 1 (see the no-coalescing control).
    assert 0 < max(control) <= 1e-4 and result["control_param_diff"] <= 1e-5, result


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_gradcache_steps_equal_ddp_with_one_reduction_per_step(zero_results, stage):
    result = zero_results[str(stage)]
    assert_within_rounding(result, exact_first_step=stage != 3)
    assert result["param_moved"] > 100 * ZERO3_TOLERANCE  # the steps did move the weights
    # 3 + 6 chunks per step, reduced as often as one plain backward: once per bucket, not per chunk.
    assert result["plain_reductions"] > 1
    assert result["cached_reductions"] == [result["plain_reductions"]] * 3, result
    # Every chunk's graph was kept from pass 1 (none re-embedded), which DDP's reference re-embeds.
    assert result["kept"] == [1.0] * 3, result


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_optimizer_offload_equals_ddp(zero_results, stage):
    """DeepSpeed's CPU Adam on offloaded state against torch's AdamW: its vectorised update rounds
    differently, which the rounding control covers; ZeRO-3 adds its own matmul rounding."""
    result = zero_results[f"{stage}-offload"]
    assert_within_rounding(result, exact_first_step=stage != 3)
    assert result["cached_reductions"] == [result["plain_reductions"]] * 3, result


def test_zero_replays_dropout_like_ddp(zero_results):
    """Dropout 0.1 on both sides: pass 2 through the engine must redraw pass 1's masks (no
    clipping in this run: DDP's and ZeRO's clipping norms round differently, see the script)."""
    result = zero_results["2-dropout"]
    assert_within_rounding(result)
    assert result["cached_reductions"] == [result["plain_reductions"]] * 3, result


def test_without_coalescing_zero_reduces_per_chunk_and_drifts(zero_results):
    """The negative control: a cached step without coalesce_grad_reduction gets the engine's
    per-backward reductions, and under ZeRO-1 each chunk's reduction replaces the last one's."""
    result = zero_results["1-nocoalesce"]
    assert result["cached_reductions"][0] == 9 * result["plain_reductions"], result
    assert result["grad_diffs"][0] > 0.1, result  # what the bounds above must catch
    assert result["param_diff"] > 100 * CONTROL_FACTOR * result["control_param_diff"], result
