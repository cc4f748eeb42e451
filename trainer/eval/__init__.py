"""Evaluation: what a run, the tools and the benchmarks score retrieval with.

  beir.py         a BEIR-layout folder read and checked (corpus, queries, judgements)
  evaluate.py     exact search over every rank's share, then NDCG@10, recall@10, MRR@10
  calibration.py  cosine -> P(relevant): Platt and isotonic fits, ECE, Brier, reliability

It imports nothing of `trainer` but the library, data and retrieval (pyproject.toml's
import-linter contracts). `python -m trainer.evaluate` is the tool (trainer/evaluate.py).
"""
