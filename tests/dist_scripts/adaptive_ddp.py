"""Under torchrun (2 ranks, gloo): rank 1 alone runs out of memory, first in pass 1 of a step,
then (at the halved budget) in pass 2 (DDP without buffer broadcasts, as the trainer builds it). Both ranks must agree to halve and run the step again,
and end with the gradients DDP gives at the final budget from the start. Rank 0 prints one
"RESULT {json}" line per rank."""

import gc
import json

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.tiny import token_batch, tiny_encoder
from trainer.core import distributed
from trainer.core.autochunk import AdaptiveStep
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss

env = distributed.init_distributed()
W, r = env.world_size, env.rank
LOCAL = 8
rows = slice(r * LOCAL, (r + 1) * LOCAL)
queries = {k: v[rows] for k, v in token_batch(LOCAL * W, 12, seed=1).items()}
docs = {k: v[rows] for k, v in token_batch(LOCAL * W, 20, seed=2).items()}
planned = ["pass 1", "pass 2"] if r == 1 else []  # the failures rank 1 meets, in order
# The classic step (padded chunks, every one re-embedded), whose pass 1 runs without grad: what
# this script's failures are planned by. Kept graphs' own fallback is tests/test_packing.py's.
CLASSIC = dict(pack=False, keep_graphs=False)


class FailsWhenPlanned(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_encoder(dropout=0.1, seed=0)

    def forward(self, input_ids, attention_mask):
        phase = "pass 2" if torch.is_grad_enabled() else "pass 1"
        if planned and planned[0] == phase:
            planned.pop(0)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


model = FailsWhenPlanned()
step = AdaptiveStep(GradCache(DDP(model, broadcast_buffers=False), ContrastiveLoss(), chunk_tokens=160, recover_oom=True,
                              **CLASSIC), torch.device("cpu"),
                    say=lambda _: None)
torch.manual_seed(100 + r)
out = step(queries, docs)

reference = tiny_encoder(dropout=0.1, seed=0)
torch.manual_seed(100 + r)
expected = GradCache(DDP(reference, broadcast_buffers=False), ContrastiveLoss(), chunk_tokens=step.budget, **CLASSIC)(queries, docs)
ours, theirs = grads(model.inner), grads(reference)
result = {
    "rank": r,
    "changes": step.changes,
    "loss_diff": abs(float(out.loss) - float(expected.loss)),
    "grad_diff": max(float((ours[n] - theirs[n]).abs().max()) for n in theirs),
}
# Rank 0 prints every rank's line: two processes writing to one pipe could interleave them.
results = distributed.gather_objects(result)
if r == 0:
    for line in results:
        print("RESULT " + json.dumps(line), flush=True)
# The DDP wrappers go before their process group does: one destroyed after it, at interpreter
# exit, can abort the process ("terminate called without an active exception").
del step, expected, out
gc.collect()
distributed.teardown()
