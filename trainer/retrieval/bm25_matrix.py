"""A shard's BM25 score matrix, in bm25s's layout (CSC: a column per term, its texts in order),
built from the shard's flat term ids a chunk of texts at a time.

bm25s builds it from a Python loop over texts into three arrays of every (text, term) entry,
then sorts them all at once: at its peak ~36 bytes per entry (scores, text and term ids, a packed
int64 key and its argsort, the sorted copies). The columns' sizes are known beforehand (each
term's document frequency in the shard), so here each chunk's entries go straight to their
places: 8 bytes per entry (the result) plus one chunk's worth, and no Python loop per text.

The scores are bm25s's, bit for bit: the same term-frequency function (bm25s's own, given arrays
where it is given scalars; numpy promotes both alike, NEP 50) and the same float64 product with
the float32 idf, rounded once to float32 on assignment.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CHUNK_TEXTS = 65536  # texts scored at a time: ~12 bytes per entry of a chunk alive at once


def score_matrix(flat: np.ndarray, offsets: np.ndarray, doc_freqs: np.ndarray, idf: np.ndarray, tfc: Callable,
                 dtype: str = "float32", int_dtype: str = "int32") -> dict:
    """{data, indices, indptr, num_docs} of the texts whose term ids are flat[offsets[i]:offsets[i+1]],
    with doc_freqs[term] = how many of them hold each term, idf per term, and tfc(tf_array, l_d)
    the term-frequency component (bm25s's, its other arguments bound)."""
    n_docs = len(offsets) - 1
    indptr = np.zeros(len(idf) + 1, dtype=np.int64)
    np.cumsum(np.pad(doc_freqs, (0, len(idf) - len(doc_freqs))), out=indptr[1:])
    data, indices = np.empty(indptr[-1], dtype=dtype), np.empty(indptr[-1], dtype=int_dtype)
    cursor = indptr[:-1].copy()  # each column's next free place
    for t0 in range(0, n_docs, CHUNK_TEXTS):
        t1 = min(t0 + CHUNK_TEXTS, n_docs)
        lengths = np.diff(offsets[t0 : t1 + 1])
        term, text, tf = _entries(flat[offsets[t0] : offsets[t1]], lengths)
        score = idf[term] * tfc(tf_array=tf.astype(dtype), l_d=lengths[text])
        # Entries come sorted by term, then text: a term's k-th entry of the chunk goes k places
        # after its column's cursor, and chunks come in text order, so columns end sorted by text.
        terms, starts, sizes = np.unique(term, return_index=True, return_counts=True)
        places = cursor[term] + np.arange(len(term)) - np.repeat(starts, sizes)
        data[places] = score
        indices[places] = text + t0
        cursor[terms] += sizes
    if not np.array_equal(cursor, indptr[1:]):
        raise ValueError("document frequencies do not match the term ids (a shard's tokens changed under it)")
    return {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}


def _entries(terms: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(term, text, count) of every distinct (text, term) of a chunk, sorted by term then text."""
    n = max(len(lengths), 1)
    text = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    keys, counts = np.unique(terms.astype(np.int64) * n + text, return_counts=True)
    term, text = np.divmod(keys, n)
    return term, text, counts
