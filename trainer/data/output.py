"""Writing rows out (the tools' outputs: mined, scored): JSONL, JSONL.gz or Parquet, into a
temporary file renamed when complete, so a crash never leaves a half-written output."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

from trainer.core import atomic

ROWS_PER_PARQUET_BLOCK = 65536
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def check_output(input_path: str, output: str, overwrite: bool) -> None:
    """Refuse, before any work, an output that could not or should not be written."""
    out = Path(output)
    if not out.name.endswith(SUFFIXES):
        raise ValueError(f"output={output}: must end in .jsonl, .jsonl.gz or .parquet")
    if out.exists() and not overwrite:
        raise ValueError(f"output={output} exists; pass overwrite=true to replace it")
    if Path(input_path).resolve() == out.resolve():
        raise ValueError(f"output={output} is the input file; write elsewhere")
    if not out.parent.is_dir():
        raise ValueError(f"output={output}: folder {out.parent} does not exist")


def write_rows(output: str | Path, rows: Iterable[dict]) -> int:
    """Write rows to output (by its suffix), whole or not at all; returns how many."""
    output = Path(output)
    written = 0
    with atomic.replacing(output) as tmp:
        if output.name.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            writer, block = None, []
            for row in rows:
                block.append(row)
                if len(block) == ROWS_PER_PARQUET_BLOCK:
                    writer = _parquet_block(pa, pq, writer, tmp, block)
                    written, block = written + len(block), []
            if block or writer is None:
                writer = _parquet_block(pa, pq, writer, tmp, block)
                written += len(block)
            writer.close()
        else:
            opener = gzip.open if output.name.endswith(".gz") else open
            with opener(tmp, "wt", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                    written += 1
    return written


def _parquet_block(pa, pq, writer, path: Path, rows: list[dict]):
    table = pa.Table.from_pylist(rows, schema=writer.schema if writer is not None else None)
    writer = writer or pq.ParquetWriter(path, table.schema)
    writer.write_table(table)
    return writer
