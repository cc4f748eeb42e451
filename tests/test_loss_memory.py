"""The tiled loss holds far less memory than the dense one at B = 8192, d = 384.

Memory, not time: each variant runs in a fresh subprocess (bench/loss_memory.py) and reports how
far its peak RSS rose during one forward + backward of the loss.
"""

from __future__ import annotations

import importlib.util

from tests.tiny import REPO

spec = importlib.util.spec_from_file_location("loss_memory", REPO / "bench" / "loss_memory.py")
loss_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loss_memory)


def test_tiled_loss_peak_memory_is_far_below_dense_at_8192():
    common = dict(batch=8192, dim=384, negatives=0, preset="infonce", device="cpu")
    dense = loss_memory.measure_in_subprocess(tile=0, **common)
    tiled = loss_memory.measure_in_subprocess(tile=1024, **common)
    # The dense B x B fp32 score matrix alone is 256 MiB, and autograd keeps several of its kind.
    assert dense["peak_mib"] > 512, dense
    assert tiled["peak_mib"] * 3 < dense["peak_mib"], (dense, tiled)
