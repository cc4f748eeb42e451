"""The hashes data and mining share: a text's 64-bit hash (duplicate masking, the mining pool's
deduplication), a file's fingerprint (the token cache's key, a mining run's resume check) and
splitmix64's mixer (seeded permutations and draws that need no table and no generator state)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

# splitmix64's constants: the golden-ratio increment and the finaliser's two multipliers.
GOLDEN = 0x9E3779B97F4A7C15
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def text_hash(text: str) -> int:
    """A stable signed 64-bit hash of a text (blake2b): the same on every rank, run and machine."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def text_hashes(texts: list[str]) -> np.ndarray:
    """text_hash of each text, as the same 64 bits read unsigned (uint64)."""
    return np.fromiter((text_hash(t) for t in texts), dtype=np.int64, count=len(texts)).view(np.uint64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a strong 64-bit mixing of each element (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX_1
        x = (x ^ (x >> np.uint64(27))) * _MIX_2
        return x ^ (x >> np.uint64(31))


def file_fingerprint(path: str | Path) -> dict:
    """What tells a file's (or a folder's files') version apart without reading all of it: each
    file's path, size, modification time and a digest of its first and last MiB. A path that does
    not exist is fingerprinted by its name alone."""
    p = Path(path)
    if not p.exists():
        return {"missing": str(path)}
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    out = []
    for f in files:
        stat = f.stat()
        digest = hashlib.blake2b(digest_size=16)
        with open(f, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if stat.st_size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
        out.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns, digest.hexdigest()])
    return {"files": out}
