"""Mining's progress on disk, so that a crash loses at most the block being mined.

The folder `<output>.parts/` holds one part file per completed block of input rows (JSON lines,
written to a temporary name and renamed) and `manifest.json`, rewritten after each part, last,
as checkpoints are: a block counts as done only once the manifest says so. The manifest also
holds the run's fingerprint (input and corpus files, model, settings): the same command run again
resumes at the first missing block; another command finds the folder and stops, unless told to
overwrite. When every block is done the output is assembled from the parts (into a temporary
file renamed when complete) and the folder is removed. An output is a function of the parts
alone, so a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from trainer.core import atomic

MANIFEST = "manifest.json"


def parts_folder(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parts")


_held_locks: dict[Path, object] = {}


def _hold_lock(folder: Path) -> None:
    """An exclusive lock on `<folder>.lock` for this process's life (flock: the kernel releases it
    when the process dies, even by SIGKILL, so a crashed run never leaves a stale lock)."""
    import fcntl

    path = folder.with_name(folder.name + ".lock")
    if path in _held_locks:
        return
    handle = open(path, "a")  # noqa: SIM115 (held open until the process ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(f"{path} is held: another mining run of this output is still running") from None
    _held_locks[path] = handle


def release_lock(folder: Path) -> None:
    handle = _held_locks.pop(folder.with_name(folder.name + ".lock"), None)
    if handle is not None:
        Path(handle.name).unlink(missing_ok=True)
        handle.close()


class Parts:
    """The parts folder of one mining run (used by rank 0, which writes; other ranks only read)."""

    def __init__(self, folder: Path, fingerprint: dict, done: dict[int, dict] | None = None) -> None:
        self.folder, self.fingerprint = folder, fingerprint
        self.done: dict[int, dict] = dict(done or {})

    @classmethod
    def load(cls, folder: Path) -> Parts:
        """The folder as its manifest describes it."""
        saved = json.loads((folder / MANIFEST).read_text())
        return cls(folder, saved["fingerprint"], {int(k): v for k, v in saved["done"].items()})

    @classmethod
    def open(cls, folder: Path, fingerprint: dict, overwrite: bool) -> Parts:
        """Resume from folder when its manifest has this fingerprint; else start it afresh (a folder
        without a manifest died before its first block), or refuse one of another run. First, the
        folder's lock: a second run of the same output, still alive, would remove its parts."""
        _hold_lock(folder)
        if (folder / MANIFEST).exists():
            saved = cls.load(folder)
            if saved.fingerprint == fingerprint:
                return saved
            if not overwrite:
                changed = sorted(k for k in {*fingerprint, *saved.fingerprint} if fingerprint.get(k) != saved.fingerprint.get(k))
                raise ValueError(f"{folder} holds the unfinished parts of a mining run with other settings "
                                 f"({', '.join(changed)} differ); delete it, rerun that command, "
                                 "or pass overwrite=true to start over")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return cls(folder, fingerprint)

    @property
    def started(self) -> bool:
        return (self.folder / MANIFEST).exists()

    def save_manifest(self) -> None:
        manifest = {"fingerprint": self.fingerprint, "done": {str(k): v for k, v in sorted(self.done.items())}}
        atomic.write_text(self.folder / MANIFEST, json.dumps(manifest, indent=1))

    def part_path(self, block: int) -> Path:
        return self.folder / f"part-{block:06d}.jsonl"

    def write_block(self, block: int, lines: list[str], stats: dict) -> None:
        """The block's output lines, then the manifest that counts it done."""
        atomic.write_text(self.part_path(block), "".join(lines))
        self.done[block] = stats
        self.save_manifest()

    def lines(self, blocks: int) -> Iterator[bytes]:
        for block in range(blocks):
            with open(self.part_path(block), "rb") as handle:
                yield from handle

    def assemble(self, output: str | Path, blocks: int) -> int:
        """The output from the parts of blocks 0..blocks-1, in order (a temporary file renamed);
        returns how many rows it holds."""
        from trainer.data.output import write_rows

        output = Path(output)
        if output.name.endswith(".parquet"):
            return write_rows(output, (json.loads(line) for line in self.lines(blocks)))
        written = 0
        with atomic.replacing(output) as tmp, open(tmp, "wb") as raw:
            # gzip without a timestamp or a file name in its header: the same rows, the same bytes.
            handle = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if output.name.endswith(".gz") else raw
            for line in self.lines(blocks):
                handle.write(line)
                written += 1
            handle.close()
        return written

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        release_lock(self.folder)
