"""How many chunks' autograd graphs a GradCache step keeps from pass 1, within a memory budget.

A kept chunk runs pass 1 with grad and keeps its graph; pass 2 then only backpropagates its slice
of the cached gradient, without forwarding it again: 3 forward-pass equivalents instead of 4.
When every chunk fits, the step is one forward and one backward. The result is the same either
way (the embeddings are the same: one forward under the same generator state).

The budget: a number of bytes, None (no limit) or "auto": at each step, HEADROOM of the memory
the device has left (CUDA: its free memory; CPU: what the process may still take) less a
reserve the caller names (the optimizer's first-step state) and room to re-forward a chunk that
is not kept. What a kept chunk holds is measured as it is kept (CUDA: the allocator's count; CPU:
the growth of the process's resident memory), and the largest bytes-per-token seen decides
whether the next chunk fits. (Not autograd's saved-tensor hooks: with them a forward that fails
leaves its partial graph allocated, torch 2.13.) A kept forward that runs out of memory anyway is dropped and run without
grad (the step's result is unchanged), and the budget shrinks to what had fit.
"""

from __future__ import annotations

import contextlib

import torch

from trainer.core.memory import HEADROOM, available_bytes, bytes_in_use

AUTO = "auto"


class GraphKeeper:
    """Decides, chunk by chunk in pass 1, whether a chunk's graph is kept."""

    def __init__(self, budget: int | str | None, device: torch.device, reserve_bytes: int = 0) -> None:
        if isinstance(budget, str) and budget != AUTO:
            raise ValueError(f"keep_graphs budget must be a number of bytes, None or 'auto', got {budget!r}")
        self.budget, self.device, self.reserve_bytes = budget, device, reserve_bytes
        self.bytes_in_use = lambda: bytes_in_use(device)
        """What the device holds now (a test may count its own way)."""
        self.bytes_per_token = 0.0
        self.shrunk_to: int | None = None  # after an out-of-memory: what had fit
        self._limit = 0.0
        self._largest = 0
        self.used = 0

    def begin_step(self, largest_chunk_tokens: int) -> None:
        """Fix this step's limit (in bytes) before pass 1 begins."""
        self.used, self._largest = 0, largest_chunk_tokens
        if self.budget is None:
            limit = float("inf")
        elif self.budget == AUTO:
            limit = HEADROOM * available_bytes(self.device) - self.reserve_bytes
        else:
            limit = float(self.budget)
        if self.shrunk_to is not None:
            limit = min(limit, self.shrunk_to)
        self._limit = limit

    def fits(self, tokens: int) -> bool:
        if self._limit <= 0:
            return False
        # With "auto", room stays for the work that follows the kept graphs: the no-grad forwards
        # of the other chunks and a re-embedded chunk's forward and backward (about twice a
        # chunk's graph), priced at the bytes per token measured so far.
        after = 2 * self.bytes_per_token * self._largest if self.budget == AUTO else 0.0
        return self.used + self.bytes_per_token * tokens + after <= self._limit

    @contextlib.contextmanager
    def keeping(self, tokens: int):
        """Around a kept chunk's forward: counts what its graph holds."""
        before = self.bytes_in_use()
        yield
        held = max(self.bytes_in_use() - before, 0)
        self.used += held
        self.bytes_per_token = max(self.bytes_per_token, held / max(tokens, 1))

    def out_of_memory(self, while_keeping: bool, tokens: int = 0) -> None:
        """A kept forward of `tokens` ran out of memory (while_keeping): it needed more than was
        left, which bounds the bytes per token from below, and no more is kept this step. Or a
        later phase did, with this step's graphs held: keep half of them from now on."""
        if while_keeping:
            if self._limit != float("inf"):
                self.bytes_per_token = max(self.bytes_per_token, max(self._limit - self.used, 0) / max(tokens, 1))
            if self.used or self.budget is None:
                self.shrunk_to = self.used if self.shrunk_to is None else min(self.shrunk_to, self.used)
        else:
            self.shrunk_to = self.used // 2
        self._limit = 0.0  # nothing more this step
