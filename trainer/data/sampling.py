"""Which rows make global batch k: a pure function of (seed, step), the same on every rank.

Every rank computes the whole global batch and takes its own contiguous part, so 1 process with
batch B and N processes with B / N see exactly the same global batches, and resuming needs only
the step. Nothing here is O(dataset): a source's row order is a seeded bijection of its row
indices (a Feistel network), evaluated only for the rows a batch needs, instead of a stored
permutation (800 MB per rank at 100M rows).

With several sources, each step first picks where its rows come from, by weight:
- same-source batches (the default with several sources): one source per global batch, as
  nomic, Arctic-embed and BGE train: harder in-batch negatives, no source shortcut;
- mixed batches: each of the B slots draws its source (a multinomial per step).
A source's rows are used in its own seeded order, epoch after epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainer.data.hashing import GOLDEN, mix64

_SCHEDULE_BLOCK = 4096  # steps whose source draws come from one generator


def source_weights(sizes: Sequence[int], user_weights: Sequence[float], sampling: str, alpha: float) -> np.ndarray:
    """Sampling probabilities: the user's weight times proportional (size), uniform (1) or
    temperature (size ** alpha), normalised."""
    sizes = np.asarray(sizes, dtype=np.float64)
    base = {"proportional": sizes, "uniform": np.ones_like(sizes), "temperature": sizes**alpha}
    if sampling not in base:
        raise ValueError(f"data.sampling must be one of {sorted(base)}, got {sampling!r}")
    weights = base[sampling] * np.asarray(user_weights, dtype=np.float64)
    return weights / weights.sum()


# ------------------------------------------------------------------ a permutation with no table


def hash_key(*parts: int) -> int:
    """One 64-bit key from several integers (seed, source, epoch...)."""
    key = np.uint64(GOLDEN)
    for part in parts:
        key = mix64(np.array([key ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))[0]
    return int(key)


def permute(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """Position -> row under a seeded permutation of range(n): a balanced Feistel network on the
    smallest even number of bits that covers n, cycle-walking until the value falls below n
    (at most 4x the domain, so a few walks on average). A bijection of range(n) for every key."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half, mask = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    round_keys = [np.uint64(hash_key(key, r)) for r in range(rounds)]
    x = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        y = x[todo]
        for round_key in round_keys:
            left, right = y >> half, y & mask
            y = (right << half) | (left ^ (mix64(right ^ round_key) & mask))
        x[todo] = y
        todo[todo] = y >= np.uint64(n)
    return x.astype(np.int64)


# ------------------------------------------------------------------------------ global batches


@dataclass(frozen=True)
class BatchRows:
    """Rows of one batch (this rank's part): their source, row within it, and the source epoch
    they belong to (hard negatives are re-drawn per epoch)."""

    source: np.ndarray
    row: np.ndarray
    epoch: np.ndarray


class GlobalBatches:
    """The seeded sequence of global batches over one or several sources, and each rank's share."""

    def __init__(
        self,
        sizes: int | Sequence[int],
        batch_size: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        weights: Sequence[float] | None = None,
        same_source: bool = True,
        names: Sequence[str] | None = None,
    ) -> None:
        self.sizes = [sizes] if isinstance(sizes, int) else list(sizes)
        self.names = list(names) if names is not None else [f"source{k}" for k in range(len(self.sizes))]
        self.batch_size, self.seed, self.world_size, self.rank = batch_size, seed, world_size, rank
        self.same_source = same_source or len(self.sizes) == 1
        weights = np.ones(len(self.sizes)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.weights = weights / weights.sum()
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        if batch_size % world_size:
            raise ValueError(
                f"data.batch_size={batch_size} is the global batch and must divide evenly over {world_size} ranks"
            )
        if len(self.sizes) == 1 and self.sizes[0] < batch_size:
            raise ValueError(f"data.batch_size={batch_size} is larger than the {self.sizes[0]} training rows")
        if self.same_source:
            small = [(n, s) for n, s, w in zip(self.names, self.sizes, self.weights) if s < batch_size and w > 0]
            if small:
                raise ValueError(
                    f"data.batch_size={batch_size} is larger than source '{small[0][0]}' ({small[0][1]} rows): "
                    "same-source batches take a whole global batch from one source (drop it, or set "
                    "data.same_source_batches=false)"
                )
        elif sum(self.sizes) < batch_size:
            raise ValueError(f"data.batch_size={batch_size} is larger than the {sum(self.sizes)} training rows")
        self._starts = [np.zeros(len(self.sizes), dtype=np.int64)]  # per schedule block: uses of each source before it

    @property
    def steps_per_epoch(self) -> int:
        """Steps that use about every row once (incomplete batches dropped per source)."""
        if self.same_source:
            return sum(n // self.batch_size for n in self.sizes)
        return sum(self.sizes) // self.batch_size

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def global_rows(self, step: int) -> BatchRows:
        """Every rank's rows of global step `step`, rank 0's share first (each rank's is the
        next local_batch_size rows)."""
        return BatchRows(*self._global_rows(step))

    def batch_rows(self, step: int) -> BatchRows:
        """This rank's rows for global step `step` (0-based, counting across epochs)."""
        whole = self._global_rows(step)
        start = self.rank * self.local_batch_size
        return BatchRows(*(a[start : start + self.local_batch_size] for a in whole))

    def source_of(self, step: int) -> int | None:
        """The source of every row of step `step` with same-source batches, else None."""
        if not self.same_source:
            return None
        return int(self._draws(step // _SCHEDULE_BLOCK)[step % _SCHEDULE_BLOCK]) if len(self.sizes) > 1 else 0

    def rows_seen(self, steps: int) -> dict[str, int]:
        """Rows drawn from each source in the first `steps` steps (all ranks together)."""
        return dict(zip(self.names, (self._uses_before(steps) * (self.batch_size if self.same_source else 1)).tolist()))

    # -- the schedule

    def _global_rows(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        B = self.batch_size
        if self.same_source:
            k = self.source_of(step)
            j = int(self._uses_before(step)[k]) if len(self.sizes) > 1 else step  # batches of k before this one
            per_epoch = self.sizes[k] // B
            epoch, index = divmod(j, per_epoch)
            rows = permute(np.arange(index * B, (index + 1) * B), self.sizes[k], hash_key(self.seed, k, epoch))
            return np.full(B, k), rows, np.full(B, epoch)
        counts = self._draws(step // _SCHEDULE_BLOCK)[step % _SCHEDULE_BLOCK]
        starts = self._uses_before(step)
        sources, rows, epochs = [], [], []
        for k, (count, start) in enumerate(zip(counts, starts)):
            position = start + np.arange(count)  # in source k's endless stream of epochs
            epoch, index = np.divmod(position, self.sizes[k])
            for e in np.unique(epoch):
                picked = epoch == e
                rows.append(permute(index[picked], self.sizes[k], hash_key(self.seed, k, int(e))))
                sources.append(np.full(picked.sum(), k))
                epochs.append(np.full(picked.sum(), e))
        shuffle = np.random.default_rng([self.seed, 0xBA7C, step]).permutation(B)  # sources mixed across ranks
        return tuple(np.concatenate(a)[shuffle] for a in (sources, rows, epochs))

    def _uses_before(self, step: int) -> np.ndarray:
        """Per source: batches (same-source) or rows (mixed) drawn in steps 0 .. step - 1."""
        if len(self.sizes) == 1:
            return np.array([step * (1 if self.same_source else self.batch_size)])
        block, within = divmod(step, _SCHEDULE_BLOCK)
        while len(self._starts) <= block:  # resuming at step S costs S / 4096 block draws, once
            self._starts.append(self._starts[-1] + self._block_uses(len(self._starts) - 1, _SCHEDULE_BLOCK))
        return self._starts[block] + self._block_uses(block, within)

    def _block_uses(self, block: int, steps: int) -> np.ndarray:
        draws = self._draws(block)[:steps]
        if self.same_source:
            return np.bincount(draws, minlength=len(self.sizes)).astype(np.int64)
        return draws.sum(axis=0).astype(np.int64)

    @functools.lru_cache(maxsize=4)
    def _draws(self, block: int) -> np.ndarray:
        """One block of the schedule: a source per step (same-source), or per-source row counts."""
        rng = np.random.default_rng([self.seed, 0x5C4ED, block])
        if self.same_source:
            return rng.choice(len(self.sizes), size=_SCHEDULE_BLOCK, p=self.weights)
        return rng.multinomial(self.batch_size, self.weights, size=_SCHEDULE_BLOCK)
