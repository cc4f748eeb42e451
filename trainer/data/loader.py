"""Batches made ahead of the step that needs them, and a count of how long the step waited.

The collate of step k + 1 runs while step k computes: in a background thread by default (the
collate is numpy, which releases the GIL in its copies, and the step mostly waits on the GPU or
in torch's kernels), or in DataLoader worker processes with data.num_workers > 0. On CUDA the
batches are pinned and copied with non_blocking=True, so the copy overlaps the step as well.
`wait_s` is the time the loop spent blocked in `next()`: near 0 when the input keeps up.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import torch

_DONE = object()


def to_device(batch, device: torch.device, non_blocking: bool):
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch.to(device, non_blocking=non_blocking)


def pin(batch):
    if isinstance(batch, dict):
        return {k: pin(v) for k, v in batch.items()}
    return batch.pin_memory()


class Prefetcher:
    """Iterates over `dataset[0 .. len - 1]` (e.g. StepBatches) on `device`, `depth` batches ahead.

    Args:
        depth: batches made ahead; 0 = each made when the loop asks for it (no overlap).
        num_workers: 0 = one background thread; N = a DataLoader with N worker processes.
    """

    def __init__(self, dataset, device: torch.device, depth: int = 2, num_workers: int = 0) -> None:
        self.dataset, self.device, self.depth, self.num_workers = dataset, device, depth, num_workers
        self.wait_s = 0.0
        self._pinned = device.type == "cuda"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers:
            source = self._from_workers()
        elif self.depth > 0:
            source = self._from_thread()
        else:
            source = (self.dataset[index] for index in range(len(self.dataset)))
        while True:
            start = time.perf_counter()
            batch = next(source, _DONE)
            self.wait_s += time.perf_counter() - start
            if batch is _DONE:
                return
            yield to_device(batch, self.device, non_blocking=self._pinned)

    def close(self) -> None:
        """Stop the background thread (at the latest after the batch it is making)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _from_workers(self) -> Iterator[dict]:
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self._pinned,
            prefetch_factor=max(self.depth, 1), persistent_workers=False,
        )
        yield from loader

    def _from_thread(self) -> Iterator[dict]:
        ready: queue.Queue = queue.Queue(maxsize=self.depth)

        def offer(item) -> bool:
            """Queue item unless the loop has stopped listening."""
            while not self._stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for index in range(len(self.dataset)):
                    batch = self.dataset[index]
                    if not offer(pin(batch) if self._pinned else batch):
                        return
                offer(_DONE)
            except BaseException as err:  # handed to the loop, which raises it
                offer(err)

        self._stop.clear()
        self._thread = threading.Thread(target=produce, name="prefetch", daemon=True)
        self._thread.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()
