"""Batches made ahead of the step (trainer/data/loader.py): the same batches in the same order,
whatever the depth or the workers; errors reach the loop; the wait is counted."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from trainer.data.loader import Prefetcher


class Steps(torch.utils.data.Dataset):
    """Batch i: tensors made from i, after `delay` seconds (a slow collate); fails at `fail_at`."""

    def __init__(self, n: int, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.n, self.delay, self.fail_at = n, delay, fail_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay)
        if i == self.fail_at:
            raise ValueError(f"batch {i} is bad")
        return {"queries": {"input_ids": torch.full((2, 3), i)}, "query_hashes": torch.tensor([i, -i])}


@pytest.mark.parametrize("depth, workers", [(0, 0), (1, 0), (3, 0), (2, 1)])
def test_the_same_batches_in_order(depth, workers):
    got = list(Prefetcher(Steps(7), torch.device("cpu"), depth=depth, num_workers=workers))
    assert [int(b["queries"]["input_ids"][0, 0]) for b in got] == list(range(7))
    assert all(torch.equal(b["query_hashes"], torch.tensor([i, -i])) for i, b in enumerate(got))


@pytest.mark.parametrize("depth", [0, 2])
def test_a_collate_error_reaches_the_loop(depth):
    loader = Prefetcher(Steps(5, fail_at=3), torch.device("cpu"), depth=depth)
    seen = []
    with pytest.raises(ValueError, match="batch 3 is bad"):
        for batch in loader:
            seen.append(int(batch["query_hashes"][0]))
    assert seen == [0, 1, 2]


def test_batches_are_made_while_the_step_runs_and_the_wait_is_counted():
    """A 50 ms collate and a 50 ms step: made ahead, the loop waits for the first batch only;
    made in the loop (depth 0) it waits for every one."""
    waits = {}
    for depth in (0, 2):
        loader = Prefetcher(Steps(6, delay=0.05), torch.device("cpu"), depth=depth)
        for _ in loader:
            time.sleep(0.05)
        waits[depth] = loader.wait_s
    assert waits[0] >= 6 * 0.05 * 0.9
    assert waits[2] < 0.5 * waits[0]


def test_leaving_the_loop_early_stops_the_thread():
    loader = Prefetcher(Steps(1000), torch.device("cpu"), depth=2)
    for i, _ in enumerate(loader):
        if i == 3:
            break
    loader.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
