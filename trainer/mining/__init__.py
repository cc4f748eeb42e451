"""Mining: hard negatives for training pairs, and a teacher's scores for distillation.

  miner.py            the whole mining of a command's settings: read, embed, mine block by block, assemble
  pool.py             the input read once into memory-mapped files: rows, distinct queries, the candidate pool
  pool_embeddings.py  the mining model and each rank's share of the pool's embeddings (cached on disk)
  blocks.py           one block of rows: ranked lists, the false-negative filter, the output lines
  negatives.py        the choice of negatives (fusion, exclusions, seeded random draws)
  parts.py            the resumable parts: one file per mined block, a manifest written last
  teacher.py          a cross-encoder or bi-encoder teacher, and its scores of (query, document) pairs

It imports the library, data, retrieval and evaluation; never the run or the tools
(pyproject.toml's import-linter contracts). `python -m trainer.mine` and `python -m trainer.score`
are the commands (trainer/tools/).
"""
