"""A GradCache step whose chunk budget is too large for an address-space limit (RLIMIT_AS):
AdaptiveStep must meet a real allocation failure, halve the budget and finish, with the
gradients of a step run at the final budget from the start. Prints one "RESULT {json}" line.

    python tests/memory_scripts/limited_step.py MARGIN_MB
"""

import json
import resource
import sys

import torch
from transformers import BertConfig, BertModel

from tests.tiny import token_batch
from trainer.autochunk import AdaptiveStep
from trainer.gradcache import GradCache
from trainer.losses import ContrastiveLoss
from trainer.memory import _proc_status
from trainer.model import Encoder

ROWS, LENGTH = 256, 64


def encoder() -> Encoder:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=128)  # dropout 0.1: replayed
    return Encoder(BertModel(config))


def grads(model: Encoder) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


queries, docs = token_batch(ROWS, LENGTH, seed=1), token_batch(ROWS, LENGTH, seed=2)
margin = int(sys.argv[1]) << 20
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (_proc_status("VmSize") + margin, hard))

adaptive_model = encoder()
torch.manual_seed(7)
step = AdaptiveStep(GradCache(adaptive_model, ContrastiveLoss(), chunk_tokens=ROWS * LENGTH, recover_oom=True),
                    torch.device("cpu"), say=lambda text: print(text, flush=True))
out = step(queries, docs)
after_step = torch.rand(3)

reference_model = encoder()
torch.manual_seed(7)
reference = GradCache(reference_model, ContrastiveLoss(), chunk_tokens=step.budget)(queries, docs)
after_reference = torch.rand(3)
ours, theirs = grads(adaptive_model), grads(reference_model)
print("RESULT " + json.dumps({
    "changes": step.changes,
    "budget": step.budget,
    "loss_diff": abs(float(out.loss) - float(reference.loss)),
    "grad_diff": max(float((ours[n] - theirs[n]).abs().max()) for n in theirs),
    "same_parameters": sorted(ours) == sorted(theirs),
    "generator_diff": float((after_step - after_reference).abs().max()),
}), flush=True)
