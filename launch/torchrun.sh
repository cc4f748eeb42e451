#!/usr/bin/env bash
# One node, one worker per visible GPU (one on a machine without GPUs), Hydra overrides passed on:
#   launch/torchrun.sh data.batch_size=8192 grad_cache.chunk_size=512
# NPROC_PER_NODE overrides the worker count. A worker that dies (OOM killer, a lost GPU) makes
# torchrun restart the whole group, which resumes from the last verified checkpoint, up to
# MAX_RESTARTS times (default 3). CHECK_FIRST=1 runs `python -m trainer.check` with the same
# overrides on the same workers first (exactness on this machine, the run's cost; report in
# check.json) and trains only if it passes.
set -euo pipefail
nproc=${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
# Every restart gets a fresh rendezvous store, so no attempt reads its predecessor's addresses
# (see trainer/core/distributed.py, _attempt_store).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
if [ "${CHECK_FIRST:-0}" = 1 ]; then
  torchrun --standalone --nproc_per_node="$nproc" -m trainer.check "$@"
fi
exec torchrun --standalone --nproc_per_node="$nproc" --max-restarts="${MAX_RESTARTS:-3}" -m trainer "$@"
