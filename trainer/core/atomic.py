"""Files written whole or not at all: a reader (or a resumed run) never sees a torn file, and a
write that fails leaves the old file as it was."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write. When the block ends without error it
    replaces `path` (one rename, atomic on POSIX); on an error it is removed and `path` is
    untouched. durable: flushed to disk before the rename, so a machine that crashes right after
    does not keep the new name with empty contents (manifests, resumable parts)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    """`text` into `path`, whole or not at all (see replacing)."""
    with replacing(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
