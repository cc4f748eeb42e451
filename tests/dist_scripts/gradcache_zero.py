"""Under torchrun (2 ranks, gloo): GradCache driving DeepSpeed ZeRO engines.

Three cached steps (chunk 3, 8 pairs per rank, dropout off) of a tiny BERT under DDP, every chunk
re-embedded, are the reference; the ZeRO steps keep every chunk's graph instead (the default). Then, for each argument (a stage, e.g. "3"; "2-dropout" for dropout 0.1 in both, which
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
from trainer.core import distributed
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss

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


def nudge_by_one_ulp(parameters, generator: torch.Generator) -> None:
    """Move every parameter entry one float32 ulp up or down (random, the same on every rank):
    the most that rounding the update differently can change a parameter."""
    with torch.no_grad():
        for p in parameters:
            up = torch.rand(p.shape, generator=generator) < 0.5
            p.copy_(torch.nextafter(p, torch.where(up, torch.inf, -torch.inf)))


def ddp_reference(dropout: float, clip: bool = True, nudge: bool = False) -> tuple[list[dict], dict]:
    """DDP's gradients at every step and final parameters (computed once per setting). With
    nudge, every update is followed by a one-ulp nudge of every parameter: the rounding control."""
    if (dropout, clip, nudge) not in _references:
        encoder = tiny_encoder(dropout=dropout, seed=0)
        ddp = DDP(encoder)
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=LR)
        # Every chunk re-embedded, as packed as ZeRO's (the same kernels, so step 1 can be compared
        # bit for bit; gradcache_ddp.py checks packed against padded).
        step_fn = GradCache(ddp, ContrastiveLoss.from_preset("gte"), chunk_size=CHUNK, keep_graphs=False)
        torch.manual_seed(100 + r)  # each rank its own dropout masks, as in the trainer
        grads = []
        for step in range(STEPS):
            step_fn(*batch(step))
            grads.append({n: p.grad.clone() for n, p in encoder.named_parameters()})
            if clip:
                torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if nudge:
                nudge_by_one_ulp(encoder.parameters(), torch.Generator().manual_seed(step))
        _references[dropout, clip, nudge] = grads, {n: p.detach().clone() for n, p in encoder.named_parameters()}
    return _references[dropout, clip, nudge]


def differences(grads: list[dict], params: dict, reference_grads: list[dict], reference_params: dict) -> tuple[list, float]:
    """Per step, the largest gradient difference relative to the reference's largest gradient
    entry (some tensors' true gradient is zero, attention key biases, so a per-tensor ratio would
    compare rounding noise with rounding noise); and the largest parameter difference at the end."""
    grad_diffs = []
    for step, reference in enumerate(reference_grads):
        scale = max(float(g.abs().max()) for g in reference.values())
        grad_diffs.append(max(float((grads[step][n] - g).abs().max()) for n, g in reference.items()) / scale)
    param_diff = max(float((params[n] - p).abs().max()) for n, p in reference_params.items())
    return grad_diffs, param_diff


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
    zero_grads, cached_reductions, kept = [], [], []
    torch.manual_seed(100 + r)
    for step in range(STEPS):
        before = reductions()
        # The defaults: chunks packed, every graph kept (memory allows it here).
        out = GradCache(engine, ContrastiveLoss.from_preset("gte"), chunk_size=CHUNK)(*batch(step))
        cached_reductions.append(reductions() - before)
        kept.append(out.work.kept_chunks / out.work.chunks)
        zero_grads.append({n: safe_get_full_grad(p) for n, p in zero_encoder.named_parameters()})
        engine.step()
    zero_params = {n: safe_get_full_fp32_param(p) for n, p in zero_encoder.named_parameters()}
    grad_diffs, param_diff = differences(zero_grads, zero_params, ddp_grads, ddp_params)
    # The rounding control: how far DDP itself drifts when each update is rounded one ulp off.
    control_grad_diffs, control_param_diff = differences(*ddp_reference(dropout, clip, nudge=True), ddp_grads, ddp_params)

    # The plain step's count: one backward, reduced once per bucket.
    before = reductions()
    GradCache(engine, ContrastiveLoss.from_preset("gte"))(*batch(0))
    plain_reductions = reductions() - before
    engine.step()
    initial = dict(tiny_encoder(seed=0).named_parameters())
    param_moved = max(float((ddp_params[n] - initial[n].detach()).abs().max()) for n in names)
    return {
        "grad_diffs": grad_diffs, "param_diff": param_diff, "param_moved": param_moved,
        "control_grad_diffs": control_grad_diffs, "control_param_diff": control_param_diff,
        "cached_reductions": cached_reductions, "plain_reductions": plain_reductions, "kept": kept,
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
