"""Under torchrun (2 ranks, gloo): GradCache driving DeepSpeed ZeRO engines.

Three cached steps (chunk 3, 8 pairs per rank, dropout off) of a tiny BERT under DDP are the
reference. Then, for each argument (a stage, e.g. "3"; "2-dropout" for dropout 0.1 in both, which
GradCache must replay identically through the engine; "3-offload" for CPU Adam on offloaded
optimizer state; "1-nocoalesce" for the negative control
that drops the engine's coalesce_grad_reduction), the same steps under ZeRO: their gradients and
parameters against DDP's, and DeepSpeed's comm-logger count of reductions in pass 2 against one
plain backward's. Rank 0 prints one "RESULT {json}" line per argument.
"""

import contextlib
import json
import sys

import deepspeed
import torch
from deepspeed import comm as ds_comm
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.tiny import token_batch, tiny_encoder
from trainer import distributed
from trainer.gradcache import GradCache
from trainer.losses import ContrastiveLoss

env = distributed.init_distributed()
W, r = env.world_size, env.rank
LOCAL, CHUNK, STEPS, LR = 8, 3, 3, 1e-3


def batch(step):
    queries_all = token_batch(LOCAL * W, 12, seed=10 + step)
    docs_all = token_batch(2 * LOCAL * W, 20, seed=20 + step)  # a positive and a hard negative per query
    return (
        {k: v[r * LOCAL : (r + 1) * LOCAL] for k, v in queries_all.items()},
        {k: v[2 * r * LOCAL : 2 * (r + 1) * LOCAL] for k, v in docs_all.items()},
    )


def reductions():
    """Reduction collectives DeepSpeed has issued so far (all-reduce, reduce-scatter, reduce)."""
    return sum(
        count
        for op, sizes in ds_comm.comms_logger.comms_dict.items()
        if "reduce" in op
        for count, *_ in sizes.values()
    )


_references = {}


def ddp_reference(dropout: float, clip: bool = True) -> tuple[list[dict], dict]:
    """DDP's gradients at every step and final parameters (computed once per setting)."""
    if (dropout, clip) not in _references:
        encoder = tiny_encoder(dropout=dropout, seed=0)
        ddp = DDP(encoder)
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=LR)
        step_fn = GradCache(ddp, ContrastiveLoss.from_preset("gte"), chunk_size=CHUNK)
        torch.manual_seed(100 + r)  # each rank its own dropout masks, as in the trainer
        grads = []
        for step in range(STEPS):
            step_fn(*batch(step))
            grads.append({n: p.grad.clone() for n, p in encoder.named_parameters()})
            if clip:
                torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        _references[dropout, clip] = grads, {n: p.detach().clone() for n, p in encoder.named_parameters()}
    return _references[dropout, clip]


def zero_run(stage: int, coalesce: bool, dropout: float, offload: bool, clip: bool = True) -> dict:
    """The DDP reference's steps under ZeRO `stage`."""
    ddp_grads, ddp_params = ddp_reference(dropout, clip)
    zero_encoder = tiny_encoder(dropout=dropout, seed=0)
    config = {
        "train_micro_batch_size_per_gpu": LOCAL,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0 if clip else 0.0,
        # Small buckets (several reductions per pass) and no persistent parameters, so that stage 3
        # really partitions even this tiny model's weights.
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 4000, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "comms_logger": {"enabled": True, "prof_all": True},
    }
    if offload:  # the optimizer state in CPU memory, stepped by DeepSpeed's CPU Adam (as the trainer does)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        optimizer = DeepSpeedCPUAdam(zero_encoder.parameters(), lr=LR, weight_decay=0.01, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(zero_encoder.parameters(), lr=LR)  # weight decay 0.01, as DDP's
    engine, *_ = deepspeed.initialize(model=zero_encoder, optimizer=optimizer, config=config, dist_init_required=False)
    if not coalesce:  # the negative control: the engine reduces on every backward
        engine.coalesce_grad_reduction = contextlib.nullcontext
    names = [n for n, _ in zero_encoder.named_parameters()]
    grad_diffs, cached_reductions = [], []
    torch.manual_seed(100 + r)
    for step in range(STEPS):
        before = reductions()
        GradCache(engine, ContrastiveLoss.from_preset("gte"), chunk_size=CHUNK)(*batch(step))
        cached_reductions.append(reductions() - before)
        grads = {n: safe_get_full_grad(p) for n, p in zero_encoder.named_parameters()}
        # Relative to the largest gradient entry: some tensors' true gradient is zero (attention
        # key biases), so a per-tensor ratio would compare rounding noise with rounding noise.
        scale = max(float(g.abs().max()) for g in ddp_grads[step].values())
        grad_diffs.append(max(float((grads[n] - ddp_grads[step][n]).abs().max()) for n in names) / scale)
        engine.step()
    zero_params = {n: safe_get_full_fp32_param(p) for n, p in zero_encoder.named_parameters()}
    param_diff = max(float((zero_params[n] - ddp_params[n]).abs().max()) for n in names)

    # The plain step's count: one backward, reduced once per bucket.
    before = reductions()
    GradCache(engine, ContrastiveLoss.from_preset("gte"))(*batch(0))
    plain_reductions = reductions() - before
    engine.step()
    initial = dict(tiny_encoder(seed=0).named_parameters())
    param_moved = max(float((ddp_params[n] - initial[n].detach()).abs().max()) for n in names)
    return {
        "grad_diffs": grad_diffs, "param_diff": param_diff, "param_moved": param_moved,
        "cached_reductions": cached_reductions, "plain_reductions": plain_reductions,
    }


for arg in sys.argv[1:]:
    stage, _, variant = arg.partition("-")
    # The dropout run compares mask replay without clipping: torch's clip_grad_norm_ and ZeRO's
    # partitioned norm round differently (a relative 1e-6 by step 3 with dropout's gradients, 0
    # without clipping), which is not what that run is about.
    result = zero_run(
        int(stage), coalesce=variant != "nocoalesce", dropout=0.1 if variant == "dropout" else 0.0,
        offload=variant == "offload", clip=variant != "dropout",
    )
    if r == 0:
        print("RESULT " + json.dumps({"run": arg, **result}), flush=True)
