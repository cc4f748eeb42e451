#!/usr/bin/env bash
# One node, one worker per visible GPU (one on a machine without GPUs), Hydra overrides passed on:
#   launch/torchrun.sh data.batch_size=8192 grad_cache.chunk_size=512
# NPROC_PER_NODE overrides the worker count.
set -euo pipefail
nproc=${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --standalone --nproc_per_node="$nproc" -m trainer "$@"
