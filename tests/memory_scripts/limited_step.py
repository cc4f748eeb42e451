"""A GradCache step whose chunk budget is too large for an address-space limit (RLIMIT_AS):
AdaptiveStep must meet a real allocation failure, halve the budget and finish, with the
gradients of a step run at the final budget from the start. Prints one "RESULT {json}" line.

    python tests/memory_scripts/limited_step.py MARGIN_MB [classic|kept] [CHUNK_TOKENS]

classic: padded chunks, every one re-embedded (the failures come from the chunk budget alone);
kept: the defaults, packed chunks and graphs kept within the auto memory budget, which must
stay within the limit or fall back to keeping fewer, with the classic step's gradients.
"""

import json
import resource
import sys

import torch
from transformers import BertConfig, BertModel

from tests.tiny import token_batch
from trainer.core.autochunk import AdaptiveStep
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss
from trainer.core.memory import _proc_status
from trainer.core.model import Encoder

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

mode = sys.argv[2] if len(sys.argv) > 2 else "classic"
CLASSIC = dict(pack=False, keep_graphs=False)
adaptive_model = encoder()
torch.manual_seed(7)
budget = int(sys.argv[3]) if len(sys.argv) > 3 else ROWS * LENGTH
step = AdaptiveStep(GradCache(adaptive_model, ContrastiveLoss(), chunk_tokens=budget, recover_oom=True,
                              **(CLASSIC if mode == "classic" else dict(pack=True))),
                    torch.device("cpu"), say=lambda text: print(text, flush=True))
out = step(queries, docs)
after_step = torch.rand(3)

reference_model = encoder()
torch.manual_seed(7)
# The kept run's reference re-embeds every chunk of the same packed plan (the same masks).
reference = GradCache(reference_model, ContrastiveLoss(), chunk_tokens=step.budget,
                      **(CLASSIC if mode == "classic" else dict(pack=True, keep_graphs=False)))(queries, docs)
after_reference = torch.rand(3)
ours, theirs = grads(adaptive_model), grads(reference_model)
print("RESULT " + json.dumps({
    "changes": step.changes,
    "budget": step.budget,
    "loss_diff": abs(float(out.loss) - float(reference.loss)),
    "grad_diff": max(float((ours[n] - theirs[n]).abs().max()) for n in theirs),
    "same_parameters": sorted(ours) == sorted(theirs),
    "generator_diff": float((after_step - after_reference).abs().max()),
    "kept_chunks": out.work.kept_chunks, "chunks": out.work.chunks,
}), flush=True)
