"""Texts on disk, read by id through a memory map: an Arrow IPC file with one string column.

Mining at scale needs the candidate pool's texts on every rank (to embed and index its shard, to
write the chosen negatives), but holding them as Python strings costs about 1 GB per million
texts on every rank. A memory-mapped Arrow file costs the pages being read, shared by every
process on the machine, and is written once, batch by batch, without holding all texts at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from trainer.core.atomic import replacing

SCHEMA = pa.schema([("text", pa.string())])
READS_PER_MAP = 2048  # texts read under one memory map (each may touch a page of its own: ~8 MB)


def write_texts(path: str | Path, batches: Iterable[list[str]]) -> int:
    """Write the texts, batch by batch, into a temporary file renamed when complete; returns how many."""
    path = Path(path)
    count = 0
    with replacing(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        for texts in batches:
            if texts:
                writer.write_batch(pa.record_batch([pa.array(texts, pa.string())], schema=SCHEMA))
                count += len(texts)
    return count


class TextStore:
    """The texts of a write_texts file, by id (their order in the file), read through short-lived
    memory maps: pages read stay in the OS's cache, shared by every process, but leave this
    process's resident memory with their map, however many ids it has read so far."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self._reader() as reader:
            sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        self._starts = np.cumsum([0, *sizes]).astype(np.int64)

    @contextmanager
    def _reader(self) -> Iterator[pa.ipc.RecordBatchFileReader]:
        with pa.memory_map(str(self.path)) as source:
            yield pa.ipc.open_file(source)

    def _columns(self, batches: Iterable[int], reads: Iterable[int]) -> Iterator[pa.Array]:
        """The stored batches' columns in turn, reads[j] texts to be read from the j-th. The file is
        mapped anew once READS_PER_MAP texts were read under one map: pages read leave RSS when
        their map closes, so at most ~READS_PER_MAP pages are resident at a time (a block's
        negatives spread over the whole pool would otherwise touch all of its pages: 66 MB at 1M
        texts), while a small read still opens the file once (~0.2 ms an opening)."""
        stack, read = None, READS_PER_MAP
        try:
            for batch, count in zip(batches, reads):
                if read >= READS_PER_MAP:
                    if stack is not None:
                        stack.close()
                    stack, read = ExitStack(), 0
                    reader = stack.enter_context(self._reader())
                yield reader.get_batch(int(batch)).column(0)
                read += int(count)
        finally:
            if stack is not None:
                stack.close()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.take([i])[0]

    def take(self, ids: Iterable[int] | np.ndarray) -> list[str]:
        """The texts of ids, in that order. Each stored batch is read with one take: pyarrow's take
        on a chunked column would first concatenate the whole column into memory."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"ids outside 0..{len(self) - 1}")
        out: list[str | None] = [None] * len(ids)
        batch_of = np.searchsorted(self._starts, ids, side="right") - 1
        batches, counts = np.unique(batch_of, return_counts=True)
        for batch, column in zip(batches, self._columns(batches, counts)):
            where = np.flatnonzero(batch_of == batch)
            texts = column.take(pa.array(ids[where] - self._starts[batch])).to_pylist()
            for position, text in zip(where.tolist(), texts):
                out[position] = text
        return out  # type: ignore[return-value]

    def lengths(self) -> np.ndarray:
        """Each text's length in characters (code points, as Python's len)."""
        import pyarrow.compute as pc

        parts = [pc.utf8_length(column).to_numpy(zero_copy_only=False) for column in self._whole_batches()]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def batches(self) -> Iterator[list[str]]:
        """The texts in order, one stored batch at a time."""
        for column in self._whole_batches():
            yield column.to_pylist()

    def _whole_batches(self) -> Iterator[pa.Array]:
        batches = range(len(self._starts) - 1)
        return self._columns(batches, np.diff(self._starts))
