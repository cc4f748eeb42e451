"""How many chunks' autograd graphs a GradCache step keeps from pass 1, within a memory budget.

A kept chunk runs pass 1 with grad and keeps its graph; pass 2 then only backpropagates its slice
of the cached gradient, without forwarding it again: 3 forward-pass equivalents instead of 4.
When every chunk fits, the step is one forward and one backward. The result is the same either
way (the embeddings are the same: one forward under the same generator state).

The budget: a number of bytes, None (no limit) or "auto": at each step, HEADROOM of the memory
the device has left (CUDA: its free memory; CPU: what the process may still take) less a
reserve the caller names (the optimizer's first-step state) and room to re-forward a chunk that
is not kept. What a kept chunk holds is measured as it is kept (CUDA: the allocator's count; CPU:
the bytes of the tensors autograd saved), and the largest bytes-per-token seen decides whether
the next chunk fits. A kept forward that runs out of memory anyway is dropped and run without
grad (the step's result is unchanged), and the budget shrinks to what had fit.
"""

from __future__ import annotations

import contextlib

import torch

from trainer.memory import available_bytes

AUTO = "auto"
HEADROOM = 0.85
"""Share of the memory left that kept graphs may plan to use (the rest absorbs fragmentation,
the allocator's rounding and the loss's own work)."""


class GraphKeeper:
    """Decides, chunk by chunk in pass 1, whether a chunk's graph is kept."""

    def __init__(self, budget: int | str | None, device: torch.device, reserve_bytes: int = 0) -> None:
        if isinstance(budget, str) and budget != AUTO:
            raise ValueError(f"keep_graphs budget must be a number of bytes, None or 'auto', got {budget!r}")
        self.budget, self.device, self.reserve_bytes = budget, device, reserve_bytes
        self.bytes_per_token = 0.0
        self.shrunk_to: int | None = None  # after an out-of-memory: what had fit
        self._limit = 0.0
        self.used = 0

    def begin_step(self, largest_chunk_tokens: int) -> None:
        """Fix this step's limit (in bytes) before pass 1 begins."""
        self.used = 0
        if self.budget is None:
            limit = float("inf")
        elif self.budget == AUTO:
            room_for_a_reforward = 2 * self.bytes_per_token * largest_chunk_tokens
            limit = HEADROOM * available_bytes(self.device) - self.reserve_bytes - room_for_a_reforward
        else:
            limit = float(self.budget)
        if self.shrunk_to is not None:
            limit = min(limit, self.shrunk_to)
        self._limit = limit

    def fits(self, tokens: int) -> bool:
        return self.used + self.bytes_per_token * tokens <= self._limit

    @contextlib.contextmanager
    def keeping(self, tokens: int, parameters: list[torch.Tensor]):
        """Around a kept chunk's forward: counts what its graph holds."""
        if self.device.type == "cuda":
            before = torch.cuda.memory_allocated(self.device)  # the allocator's own count: no sync
            yield
            held = torch.cuda.memory_allocated(self.device) - before
        else:
            with _saved_bytes(parameters) as saved:
                yield
            held = sum(saved.values())
        self.used += held
        self.bytes_per_token = max(self.bytes_per_token, held / max(tokens, 1))

    def out_of_memory(self, while_keeping: bool) -> None:
        """A kept forward ran out of memory (while_keeping): keep at most what had fit. Or a later
        phase did, with this step's graphs held: keep half of them from now on."""
        self.shrunk_to = self.used if while_keeping else self.used // 2
        self._limit = 0.0  # nothing more this step


@contextlib.contextmanager
def _saved_bytes(parameters: list[torch.Tensor]):
    """{storage: bytes} of the tensors autograd saves for backward inside the block, parameters
    excluded (they are held anyway). Storages shared by several saved views count once."""
    held_anyway = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held_anyway:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved
