"""Hard-negative choice, pure numpy: exclusions, reciprocal rank fusion and the false-negative
filter over ranked candidate lists (rows of pool ids, -1 = none). Used by trainer/mining/blocks.py."""

from __future__ import annotations

import numpy as np

from trainer.data.hashing import GOLDEN, mix64


def drop_excluded(lists: np.ndarray, query_ids: np.ndarray, excluded: np.ndarray, pool_size: int, keep: int) -> np.ndarray:
    """Each row (query query_ids[i]) of ranked pool ids (-1 = none) without its excluded texts
    (keys query_id * pool_size + pool_id), order kept, cut to `keep` and padded with -1."""
    ids = np.asarray(query_ids, dtype=np.int64)[:, None]
    ok = (lists >= 0) & ~np.isin(ids * pool_size + lists, excluded)
    order = np.argsort(~ok, axis=1, kind="stable")  # kept entries first, in their order
    kept = np.take_along_axis(np.where(ok, lists, -1), order, axis=1)[:, :keep]
    return np.pad(kept, ((0, 0), (0, keep - kept.shape[1])), constant_values=-1)


def fuse(lists: list[np.ndarray], rrf_k: int, keep: int, pool_size: int) -> np.ndarray:
    """Reciprocal rank fusion of ranked lists (rows of pool ids, -1 = none): a text scores the sum
    of 1 / (rrf_k + rank) over the lists that hold it (rank from 1); ties go to the lower id."""
    if len(lists) == 1:
        return lists[0][:, :keep]
    rows, width = len(lists[0]), sum(x.shape[1] for x in lists)
    ids = np.concatenate(lists, axis=1)
    ranks = np.concatenate([np.broadcast_to(np.arange(1, x.shape[1] + 1), x.shape) for x in lists], axis=1)
    row = np.broadcast_to(np.arange(rows)[:, None], (rows, width))
    valid = ids >= 0
    key = row[valid] * pool_size + ids[valid]
    unique, inverse = np.unique(key, return_inverse=True)
    score = np.bincount(inverse, weights=1.0 / (rrf_k + ranks[valid]))
    u_row, u_id = unique // pool_size, unique % pool_size
    order = np.lexsort((u_id, -score, u_row))
    u_row, u_id = u_row[order], u_id[order]
    starts = np.searchsorted(u_row, np.arange(rows))
    position = np.arange(len(u_row)) - starts[u_row]
    out = np.full((rows, keep), -1, dtype=np.int64)
    take = position < keep
    out[u_row[take], position[take]] = u_id[take]
    return out


def choose(
    candidates: np.ndarray,
    scores: np.ndarray,
    positive_scores: np.ndarray,
    num_negatives: int,
    max_score_ratio: float | None,
    margin: float | None,
    sampling: str,
    random_keys: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per row (candidates in rank order, -1 = none): the filter, then num_negatives survivors,
    the best-ranked (sampling=top) or those of the lowest random_keys (sampling=random; one key per
    candidate, e.g. from draw_keys). Returns (chosen (rows, n) ids, -1 for rows without enough;
    their scores; candidates dropped by the filter)."""
    valid = candidates >= 0
    too_close = np.zeros_like(valid)
    if max_score_ratio is not None:
        too_close |= scores > max_score_ratio * positive_scores[:, None]
    if margin is not None:
        too_close |= scores > positive_scores[:, None] - margin
    survivors = valid & ~too_close
    if sampling == "random":
        if random_keys is None:
            raise ValueError("sampling=random needs random_keys")
        keys = np.where(survivors, random_keys, np.inf)
        picked = np.zeros_like(survivors)
        best = np.argsort(keys, axis=1, kind="stable")[:, :num_negatives]
        np.put_along_axis(picked, best, True, axis=1)
        picked &= survivors
    else:
        picked = survivors & (np.cumsum(survivors, axis=1) <= num_negatives)
    enough = picked.sum(axis=1) == num_negatives
    order = np.argsort(~picked, axis=1, kind="stable")[:, :num_negatives]  # picked first, in rank order
    chosen = np.where(enough[:, None], np.take_along_axis(candidates, order, axis=1), -1)
    chosen_scores = np.take_along_axis(scores, order, axis=1)
    return chosen, chosen_scores, int((valid & too_close).sum())




def draw_keys(seed: int, rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) keys, one per (row, candidate id): a hash (splitmix64's mixer) of the seed,
    the row's position in the input and the candidate's pool id. A row's draw depends on nothing
    else, so blocks, ranks and a resumed run all draw the same negatives."""
    mask = (1 << 64) - 1
    with np.errstate(over="ignore"):
        x = np.uint64((seed * GOLDEN) & mask) ^ (np.asarray(rows, np.int64).astype(np.uint64)[:, None] * np.uint64(0xD1B54A32D192ED03))
        x = mix64(x ^ (np.asarray(candidates, np.int64).astype(np.uint64) * np.uint64(0x8CB92BA72F3D8DD7)))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53
