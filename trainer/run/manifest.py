"""A checkpoint's manifest: the size and SHA-256 of every file in it, written after all of them.

A checkpoint folder whose manifest is missing, or that disagrees with what is on disk, was cut
short (a crash, a full disk, a node lost mid-write) or damaged afterwards; resume skips it.
Hashing is shared out: rank r hashes every W-th file, so a sharded checkpoint of many GB costs
each rank only its share of the reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trainer.core import atomic, distributed

MANIFEST = "manifest.json"
_FORMAT = 1


def _digest(path: Path, durable: bool) -> str:
    with path.open("rb") as f:
        if durable:  # writing: make the file durable before the manifest vouches for it
            os.fsync(f.fileno())
        return hashlib.file_digest(f, "sha256").hexdigest()


def _shared_hashes(folder: Path, names: list[str], durable: bool = False) -> dict[str, str]:
    """{name: sha256} for names in folder, every rank hashing its share (a collective); durable
    also fsyncs each file."""
    mine = {name: _digest(folder / name, durable) for name in names[distributed.rank() :: distributed.world_size()]
            if (folder / name).is_file()}
    merged: dict[str, str] = {}
    for part in distributed.gather_objects(mine):
        merged.update(part)
    return merged


def _listing(folder: Path) -> list[str]:
    """Every file under folder (relative, sorted), as rank 0 sees it, on every rank."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST) \
        if distributed.is_main() else None
    return distributed.broadcast_object(names)


def write(folder: Path) -> None:
    """Hash every file in folder and write folder/manifest.json (a collective; rank 0 writes)."""
    names = _listing(folder)
    hashes = _shared_hashes(folder, names, durable=True)
    if distributed.is_main():
        files = {name: {"size": (folder / name).stat().st_size, "sha256": hashes[name]} for name in names}
        atomic.write_text(folder / MANIFEST, json.dumps({"format": _FORMAT, "files": files}, indent=1), durable=True)
    distributed.barrier()


def problem(folder: Path) -> str | None:
    """None if folder matches its manifest, else what is wrong, in a few words naming the file
    (a collective: every rank gets the same answer)."""
    found = None
    manifest: dict | None = None
    if distributed.is_main():
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            files = manifest["files"]
            assert isinstance(files, dict)
        except FileNotFoundError:
            found = f"no {MANIFEST} (the save never finished)"
        except (ValueError, KeyError, AssertionError):
            found = f"{MANIFEST} is not a valid manifest"
        else:
            for name, entry in sorted(files.items()):
                path = folder / name
                if not path.is_file():
                    found = f"{name} is missing"
                    break
                size = path.stat().st_size
                if size != entry["size"]:
                    found = f"{name} is {size} bytes, the manifest says {entry['size']}"
                    break
    found, manifest = distributed.broadcast_object((found, manifest))
    if found is not None:
        return found
    names = sorted(manifest["files"])
    hashes = _shared_hashes(folder, names)
    for name in names:
        if hashes.get(name) != manifest["files"][name]["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (its content changed)"
    return None
