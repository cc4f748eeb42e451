#!/usr/bin/env bash
# Run by `srun` as the one task of each node: starts this node's torchrun, which starts one worker
# per GPU. All nodes meet at a c10d rendezvous on the job's first node, on a port derived from the
# job id (every node computes the same one without talking). Hydra overrides are passed on.
# TRAINER_MODULE names the entry point (default trainer; train.sbatch's CHECK_FIRST=1 runs
# trainer.check through it first).
set -euo pipefail
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}}
master=$(python -c "import os; from trainer.core.distributed import first_host; print(first_host(os.environ['SLURM_JOB_NODELIST']))")
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# The stop warning arrives as USR1 at every process of this task (torchrun, its workers, W&B's
# service). Ignored dispositions survive exec, so torchrun and everything started before the
# workers install their handler ignore it (USR1 would otherwise kill torchrun); the workers catch
# it and checkpoint at an agreed step.
trap '' USR1
# A worker that dies makes torchrun restart the group on every node (MAX_RESTARTS times, default
# 3), resuming from the last verified checkpoint; a fresh rendezvous store per restart keeps the
# attempts apart (see trainer/core/distributed.py, _attempt_store).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun \
  --nnodes="${SLURM_NNODES:-1}" --node_rank="${SLURM_NODEID:-0}" --nproc_per_node="$nproc" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  --rdzv_backend=c10d --rdzv_endpoint="$master:$port" --rdzv_id="$SLURM_JOB_ID" \
  -m "${TRAINER_MODULE:-trainer}" "$@"
