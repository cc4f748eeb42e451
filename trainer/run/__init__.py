"""The run: what `python -m trainer` builds from its Hydra config and trains.

  config.py             the training schema: typed dataclasses, one docstring per field
  app.py                what every Hydra app shares: conf/'s place, one-line failures
  build.py              a Run from the config: data, encoder, loss, step, backend, logger
  loop.py               the training loop: steps, evaluation, early stopping, checkpoints, export
  optimizer.py          AdamW over the trainable parameters, the schedule, a step's result
  backends.py           plain/DDP training (TrainingBackend), and the choice of backend
  deepspeed_backend.py  DeepSpeed ZeRO 1-3 behind the same interface
  deepspeed_config.py   the DeepSpeed JSON built from deepspeed.* (or a user's file, checked)
  checkpoint.py         checkpoints: written whole or not at all, kept, resumed
  manifest.py           a checkpoint's manifest: every file's size and hash, checked on resume
  safe_load.py          torch.load limited to tensors and plain containers
  preemption.py         SIGTERM/SIGUSR1 agreed over ranks: stop at a step boundary, checkpoint
  early_stopping.py     stop on an evaluation plateau, keep the best step's model
  logger.py             RunLogger: metrics.jsonl, W&B, the progress bar
  files.py              reading a run folder (records, overrides, kept step), light: no torch
  curves.py             the run's curves and the calibration's reliability diagram
  card_facts.py         what a run's model card says, gathered from the run
  model_card.py         the model card written beside the exported model

It imports every layer but the tools (pyproject.toml's import-linter contracts).
"""
