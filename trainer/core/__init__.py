"""The library: what a contrastive step is made of, usable from any loop without the harness.

  losses.py       the InfoNCE / MNRL family: directions, partitions, masking, tiled logsumexp
  distill.py      distillation terms on a group's cosines (KL, MarginMSE)
  gradcache.py    the chunked step: pass 1, the loss on everything, pass 2; one reduction per step
  chunk_plan.py   the chunks a pass forwards, planned on the host from the texts' lengths
  packing.py      packed chunks: attention per text through transformers' AttentionInterface
  kept_graphs.py  how many chunks' graphs a step keeps within its memory budget
  step_guard.py   generator state; out-of-memory errors agreed over ranks
  autochunk.py    chunk and batch sizes probed before step 1 and halved on out-of-memory
  memory.py       what counts as out of memory, what a device has left, peak use
  distributed.py  ranks from torchrun or Slurm, collectives, the gather that keeps gradients
  model.py        the encoder (a transformers model + pooling), tokenizer set-up, the export
  lora.py         merging LoRA adapters for the export
  flops.py        model FLOPs of a step and the device's peak (MFU)
  health.py       embedding-health figures (spread, alignment, uniformity)

It imports torch, transformers (and peft for LoRA) and nothing else of `trainer`: no Hydra, no
OmegaConf (pyproject.toml's import-linter contracts, checked by tests/test_layers.py).
"""
