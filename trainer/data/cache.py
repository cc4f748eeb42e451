"""The token cache: each training file tokenised once, into an Arrow file that every rank and
every later run memory-maps.

One folder per (file, tokenizer settings) under the cache directory, named by a key over the
file's fingerprint (path, size, modification time, and a hash of its first and last MiB), the
tokenizer (its full serialised definition), the max lengths, the prefixes and the column names:
change any of them and the key changes, so nothing stale is ever read. A folder is built as
`<key>.tmp-<host>-<pid>` and renamed into place when complete, under a file lock, so a crashed
build leaves nothing that looks finished, and two nodes sharing a file system build it once.

What a folder holds (data.arrow, one row per training row):
  query_ids  list<int32>          the query's token ids, special tokens included, unpadded
  doc_ids    list<list<int32>>    [positive, every hard negative the row has]
  query_hash int64, doc_hash list<int64>    text hashes for duplicate masking
  scores     list<float32>        teacher scores aligned with doc_ids, or [] for a row without
and meta.json: rows, the fewest and most hard negatives of a row, how many rows have teacher
scores, and what the key covers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from trainer.data.hashing import file_fingerprint as _content_fingerprint
from trainer.data.hashing import text_hash
from trainer.data.mapped import MappedCacheFile, Spans
from trainer.data.records import Columns
from trainer.data.sources import file_kind, text_batches

FORMAT_VERSION = 2  # 2: teacher scores
SCHEMA = pa.schema(
    [
        ("query_ids", pa.list_(pa.int32())),
        ("doc_ids", pa.list_(pa.list_(pa.int32()))),
        ("query_hash", pa.int64()),
        ("doc_hash", pa.list_(pa.int64())),
        ("scores", pa.list_(pa.float32())),
    ]
)


@dataclass(frozen=True)
class TokenSettings:
    """How texts become token ids (all of it is part of the cache key)."""

    query_max_length: int
    doc_max_length: int
    query_prefix: str = ""
    doc_prefix: str = ""


def default_cache_dir() -> Path:
    """$CONTRASTIVE_TRAINER_CACHE, else $XDG_CACHE_HOME/contrastive-trainer/data, else ~/.cache/..."""
    if os.environ.get("CONTRASTIVE_TRAINER_CACHE"):
        return Path(os.environ["CONTRASTIVE_TRAINER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "contrastive-trainer" / "data"


def file_fingerprint(path: str) -> dict:
    """A source's fingerprint: a hub dataset by its name, files by hashing.file_fingerprint."""
    return {"hub": path} if file_kind(path) == "hub" else _content_fingerprint(path)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the whole definition: vocabulary, normaliser, special tokens...
        definition = json.loads(backend.to_str())
        # ...but not the truncation and padding that the last call happened to leave set.
        definition = json.dumps({k: v for k, v in definition.items() if k not in ("truncation", "padding")})
    else:
        from datasets.fingerprint import Hasher

        definition = Hasher.hash(tokenizer)
    extra = [type(tokenizer).__name__, tokenizer.truncation_side, getattr(tokenizer, "add_bos_token", None),
             getattr(tokenizer, "add_eos_token", None)]
    return hashlib.blake2b((definition + json.dumps(extra)).encode(), digest_size=16).hexdigest()


def cache_key(path: str, columns: Columns, tokenizer: PreTrainedTokenizerBase, settings: TokenSettings) -> tuple[str, dict]:
    described = {
        "format": FORMAT_VERSION,
        "source": path,
        "fingerprint": file_fingerprint(path),
        "columns": asdict(columns),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": asdict(settings),
    }
    key = hashlib.blake2b(json.dumps(described, sort_keys=True).encode(), digest_size=12).hexdigest()
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path.rstrip("/")).name)[:60]
    return f"{stem}-{key}", described


# --------------------------------------------------------------------------------------- build


def build(
    path: str,
    columns: Columns,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenSettings,
    folder: Path,
    described: dict,
    progress: bool = True,
) -> None:
    """Tokenise `path` into `folder` (which must not exist): streamed, so memory stays bounded by
    a few blocks. Raises DataError, naming file, line and field, at the first bad row.

    A pipeline of two: while one thread encodes block i (the tokenizer's Rust code runs without
    the GIL, on all cores), this one reads and checks block i + 1, hashes its texts and writes
    block i - 1, so the Python work hides behind the encoding.
    """
    folder.mkdir(parents=True)
    rows, fewest, most, scored = 0, None, 0, 0
    bar = tqdm(desc=f"tokenising {Path(path).name}", unit=" pairs", disable=not progress, dynamic_ncols=True)
    with (
        pa.OSFile(str(folder / "data.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, SCHEMA) as writer,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenise") as encoder,
    ):
        pending = None
        for texts in text_batches(path, columns):
            block = _Block.of(texts, settings)
            job = encoder.submit(block.encoded, tokenizer, settings)
            if pending is not None:
                writer.write_table(pending.result())
            pending = job
            if block.rows:
                fewest = int(block.negatives.min()) if fewest is None else min(fewest, int(block.negatives.min()))
                most = max(most, int(block.negatives.max()))
                scored += block.scored
            rows += block.rows
            bar.update(block.rows)
        if pending is not None:
            writer.write_table(pending.result())
    bar.close()
    meta = {"rows": rows, "min_negatives": fewest or 0, "max_negatives": most, "scored_rows": scored, "key": described,
            "built_by": f"{socket.gethostname()}:{os.getpid()}"}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


@dataclass
class _Block:
    """One block's texts, prefixed and flattened row-major (each row's positive, then its
    negatives), with their hashes: everything but the encoding."""

    queries: list[str]
    docs: list[str]
    negatives: np.ndarray  # per row
    query_hash: pa.Array
    doc_hash: pa.Array
    scores: pa.Array

    @property
    def rows(self) -> int:
        return len(self.queries)

    @property
    def scored(self) -> int:
        """Rows that have teacher scores."""
        return int(np.count_nonzero(np.diff(self.scores.offsets.to_numpy())))

    @classmethod
    def of(cls, texts: pa.Table, settings: TokenSettings) -> _Block:
        queries = texts.column("query").to_pylist()
        positives = texts.column("positive").to_pylist()
        negatives = texts.column("negatives").combine_chunks()
        counts = np.diff(negatives.offsets.to_numpy())
        docs, negative_iter = [], iter(negatives.flatten().to_pylist())
        for positive, n in zip(positives, counts):
            docs.append(positive)
            docs.extend(itertools.islice(negative_iter, int(n)))
        return cls(
            queries=[settings.query_prefix + q for q in queries],
            docs=[settings.doc_prefix + d for d in docs],
            negatives=counts,
            # Hashes of the raw texts: two rows with the same text are the same example.
            query_hash=pa.array([text_hash(q) for q in queries], pa.int64()),
            doc_hash=pa.array([text_hash(d) for d in docs], pa.int64()),
            scores=texts.column("scores").combine_chunks(),
        )

    def encoded(self, tokenizer: PreTrainedTokenizerBase, settings: TokenSettings) -> pa.Table:
        row_offsets = pa.array(np.concatenate([[0], np.cumsum(self.negatives + 1)]).astype(np.int32))
        return pa.table(
            {
                "query_ids": _token_ids(tokenizer, self.queries, settings.query_max_length),
                "doc_ids": pa.ListArray.from_arrays(row_offsets, _token_ids(tokenizer, self.docs, settings.doc_max_length)),
                "query_hash": self.query_hash,
                "doc_hash": pa.ListArray.from_arrays(row_offsets, self.doc_hash),
                "scores": self.scores,
            },
            schema=SCHEMA,
        )


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> pa.ListArray:
    """The ids `tokenizer(texts, truncation=True, max_length=...)` gives, as an Arrow list array.

    A fast tokenizer's Rust backend is called directly, set up as that call sets it up: it encodes
    the batch on all cores, and we skip the per-text conversion into Python dicts (10% of a build).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        ids = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
    else:
        truncation, padding = backend.truncation, backend.padding
        try:
            backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side)
            backend.no_padding()
            # encode_batch_fast (tokenizers >= 0.20) skips character offsets: same ids, ~12% less work.
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            ids = [encoding.ids for encoding in encode(texts, add_special_tokens=True)]
        finally:  # leave the tokenizer as it was
            _restore(backend, truncation, padding)
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), pa.array(values))


def _restore(backend, truncation: dict | None, padding: dict | None) -> None:
    if truncation is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(**truncation)
    if padding is None:
        backend.no_padding()
    else:
        backend.enable_padding(**{k: v for k, v in padding.items() if k != "length" or v is not None})


# ----------------------------------------------------------------------------- build or reuse


@dataclass
class CachedFile:
    folder: Path
    rows: int
    min_negatives: int
    max_negatives: int
    scored_rows: int
    built: bool  # True if this call built it


def ensure_cached(
    path: str,
    columns: Columns,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenSettings,
    cache_dir: Path,
    progress: bool = True,
    say=print,
) -> CachedFile:
    """The cache folder of `path`, built first if no complete one exists."""
    from filelock import FileLock

    name, described = cache_key(path, columns, tokenizer, settings)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / name
    built = False
    with FileLock(str(cache_dir / f"{name}.lock")):  # another node on a shared file system waits here
        if not (final / "meta.json").exists():
            tmp = cache_dir / f"{name}.tmp-{socket.gethostname()}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"building the token cache of {path} in {final}")
            try:
                build(path, columns, tokenizer, settings, tmp, described, progress=progress)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing half-built is left behind
                raise
            if final.exists():  # an incomplete folder from an older version of this code
                shutil.rmtree(final)
            tmp.rename(final)
            built = True
        else:
            say(f"using the token cache of {path} in {final}")
    meta = json.loads((final / "meta.json").read_text())
    return CachedFile(final, meta["rows"], meta["min_negatives"], meta["max_negatives"], meta["scored_rows"], built)


class CachedRows:
    """The cached rows of one or more cache folders (one source), memory-mapped, reading only
    the rows asked for.

    Why not `datasets.Dataset` or `pyarrow.Table.take` over the mapped table: both gather from
    the whole chunked column (take combines the chunks first), so one step's 1024 random rows
    copied ~1.3 GB of a 2M-pair cache into private memory, and a rank's memory grew with the
    dataset. Here rows are read with vectorised indexes into the map (mapped.py). What the map
    does count in a rank's RSS are the cache's file pages it has read: page cache, shared by
    every rank on the node and reclaimable, at most the cache's size.
    """

    def __init__(self, folders: list[Path]) -> None:
        self.folders = [Path(f) for f in folders]
        self._open()

    def _open(self) -> None:
        self.files = [MappedCacheFile(folder / "data.arrow") for folder in self.folders]
        self._starts = np.cumsum([0] + [len(f) for f in self.files]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict:  # DataLoader workers map the files again, never copy them
        return {"folders": self.folders}

    def __setstate__(self, state: dict) -> None:
        self.folders = state["folders"]
        self._open()

    def _by_file(self, indices) -> list[tuple[MappedCacheFile, np.ndarray, np.ndarray]]:
        """(file, positions in indices, rows within the file) for each file the indices touch."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row indices must be in [0, {len(self)})")
        if len(self.files) == 1:
            return [(self.files[0], np.arange(len(indices)), indices)]
        file_of = np.searchsorted(self._starts, indices, side="right") - 1
        parts = []
        for f in np.unique(file_of).tolist():
            where = np.flatnonzero(file_of == f)
            parts.append((self.files[f], where, indices[where] - self._starts[f]))
        return parts

    def query_spans(self, indices) -> tuple[list[tuple[np.ndarray, Spans]], np.ndarray]:
        """The rows' query tokens, as (positions in indices, spans) per file, and query hashes."""
        hashes, parts = np.zeros(len(indices), dtype=np.int64), []
        for file, where, rows in self._by_file(indices):
            spans, hashes[where] = file.query_spans(rows)
            parts.append((where, spans))
        return parts, hashes

    def doc_counts(self, indices) -> np.ndarray:
        """Documents per row: its positive plus its hard negatives."""
        counts = np.zeros(len(indices), dtype=np.int64)
        for file, where, rows in self._by_file(indices):
            counts[where] = file.doc_counts(rows)
        return counts

    def doc_spans(self, indices, slots: np.ndarray) -> tuple[list[tuple[np.ndarray, Spans]], np.ndarray]:
        """Document slots[j] (0 = positive) of row indices[j]: spans per file, and text hashes."""
        hashes, parts = np.zeros(len(indices), dtype=np.int64), []
        for file, where, rows in self._by_file(indices):
            spans, hashes[where] = file.doc_spans(rows, slots[where])
            parts.append((where, spans))
        return parts, hashes

    def doc_scores(self, indices, slots: np.ndarray) -> np.ndarray:
        """Teacher score of document slots[j] of row indices[j] (rows must have scores)."""
        out = np.zeros(len(indices), dtype=np.float32)
        for file, where, rows in self._by_file(indices):
            out[where] = file.doc_scores(rows, slots[where])
        return out

    def score_counts(self, indices) -> np.ndarray:
        """Teacher scores per row: 1 + its negatives, or 0 for a row without."""
        counts = np.zeros(len(indices), dtype=np.int64)
        for file, where, rows in self._by_file(indices):
            counts[where] = file.score_counts(rows)
        return counts
