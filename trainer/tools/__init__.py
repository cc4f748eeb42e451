"""The tools: one thin module per command, each `python -m trainer.<tool>` (trainer/<tool>.py is the
entry point that names it).

  evaluate.py   a model's retrieval figures on a BEIR-layout set (and its calibration's)
  calibrate.py  fit cosine -> P(relevant) on judged pairs, write it beside the model, update its card
  mine.py       hard negatives for training pairs (trainer/mining/)
  score.py      a teacher's scores of every row's [positive] + negatives
  plot.py       the curves of one run or of several overlaid
  summary.py    a sweep's table (CSV) and heatmap
  check/        the cluster check: exactness of the gather, the chunking and the reduction here, the run's cost

What they share: runner.py (a tool's Hydra app under any launcher), configs.py (their schemas) and
common.py (evaluate's and calibrate's model, loaded through trainer.core.embedders, the one
loader). No tool imports another, and nothing but the entry points imports a tool
(pyproject.toml's import-linter contracts).
"""
