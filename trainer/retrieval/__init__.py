"""Retrieval: what evaluation and mining search with.

  search.py       exact dense search over sharded embeddings, per-shard top-k merged exactly
  ann.py          approximate dense search per shard (faiss), with its measured recall
  bm25.py         BM25 over a sharded pool, every shard scoring with the whole pool's statistics
  bm25_matrix.py  a shard's BM25 score matrix, built a chunk of texts at a time
  text_store.py   texts in a memory-mapped Arrow file, read by id

It imports nothing of `trainer` but the library (pyproject.toml's import-linter contracts).
"""
