"""The library: what a contrastive step is made of, usable from any loop without the harness.

  losses.py       the InfoNCE / MNRL family: directions, partitions, masking
  global_batch.py the global batch one rank sees: its rows, every rank's columns, gathered with gradients
  tiled_lse.py    a masked logsumexp streamed over column tiles (memory linear in the batch)
  distill.py      distillation terms on a group's cosines (KL, MarginMSE)
  gradcache.py    the chunked step: pass 1, the loss on everything, pass 2; one reduction per step
  chunk_plan.py   the chunks a pass forwards, planned on the host from the texts' lengths
  packing.py      packed chunks: attention per text through transformers' AttentionInterface
  kept_graphs.py  how many chunks' graphs a step keeps within its memory budget
  rng.py          generator state, captured and put back (chunk replay, failed steps, checkpoints)
  step_guard.py   out-of-memory errors agreed over ranks
  autochunk.py    chunk and batch sizes probed before step 1 and halved on out-of-memory
  memory.py       what counts as out of memory, what a device has left, peak use
  distributed.py  ranks from torchrun or Slurm, collectives, the gather that keeps gradients, rank-0 printing
  model.py        the encoder: a transformers model + pooling, loaded from a folder, a package or the hub
  tokenizer.py    the tokenizer set-up (decoders' end-of-text token, prompts, the length a model is meant for)
  export.py       the sentence-transformers folder written from an encoder (LoRA merged)
  embedders.py    texts -> vectors: the one loader of a model to embed with (tools, mining, teachers)
  lora.py         merging LoRA adapters for the export
  flops.py        model FLOPs of a step and the device's peak (MFU)
  health.py       embedding-health figures (spread, alignment, uniformity)

It imports torch, transformers (and peft for LoRA) and nothing else of `trainer`: no Hydra, no
OmegaConf (pyproject.toml's import-linter contracts, checked by tests/test_layers.py).
"""
