"""Under torchrun (2 ranks, gloo): GradCache through DDP gives the single-process full-batch
gradients, replays dropout, and reduces gradients once per step (counted by a comm hook), with
packed chunks and kept graphs (the defaults) as with padded chunks all re-embedded."""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.tiny import token_batch, tiny_encoder
from trainer.core import distributed
from trainer.core.chunk_plan import plan_chunks
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss

env = distributed.init_distributed()
W, r = env.world_size, env.rank
LOCAL, CHUNK = 8, 3
GLOBAL = LOCAL * W
queries_all = token_batch(GLOBAL, 12, seed=1)
docs_all = token_batch(GLOBAL, 20, seed=2)  # one positive per query, no hard negatives
rows = slice(r * LOCAL, (r + 1) * LOCAL)
queries = {k: v[rows] for k, v in queries_all.items()}
docs = {k: v[rows] for k, v in docs_all.items()}


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def zero(module):
    for p in module.parameters():
        p.grad = None


def assert_close(a, b, what):
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{what} {name}: {m}")


def wrapped(dropout):
    encoder = tiny_encoder(dropout=dropout, seed=0)  # the same weights on every rank
    # A small bucket cap splits the gradients into several buckets, so "once per bucket" is tested.
    ddp = DDP(encoder, bucket_cap_mb=0.02)
    calls = [0]

    def counting_hook(state, bucket):
        calls[0] += 1
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_hook)
    return encoder, ddp, calls


CLASSIC = dict(pack=False, keep_graphs=False)  # padded chunks, every one re-embedded
for preset in ["infonce", "symmetric", "gte"]:
    # 1. Dropout off: cached DDP step == plain single-process step on the whole global batch
    # (padded, one forward), whether chunks are packed and graphs kept or not.
    reference = tiny_encoder(dropout=0.0, seed=0)
    GradCache(reference, ContrastiveLoss.from_preset(preset, gather=False), pack=False)(queries_all, docs_all)
    for name, how in {"packed+kept": {}, "padded+reembedded": CLASSIC}.items():
        encoder, ddp, calls = wrapped(dropout=0.0)
        GradCache(ddp, ContrastiveLoss.from_preset(preset), chunk_size=CHUNK, **how)(queries, docs)
        assert_close(grads(encoder), grads(reference), f"{preset} {name} cached-vs-plain")

# 2. One reduction per bucket per step. Step 1 lets DDP rebuild its buckets; step 2 (plain)
# counts the buckets; step 3 (cached, 3 + 3 chunks) must reduce exactly as often.
encoder, ddp, calls = wrapped(dropout=0.0)
loss_fn = ContrastiveLoss()
GradCache(ddp, loss_fn)(queries, docs)
zero(encoder)
calls[0] = 0
GradCache(ddp, loss_fn)(queries, docs)
buckets = calls[0]
cached_calls = {}
for name, how in {"kept": dict(keep_graphs=True), "reembedded": CLASSIC, "half kept": dict(keep_graphs=100_000)}.items():
    zero(encoder)
    calls[0] = 0
    step = GradCache(ddp, loss_fn, chunk_size=CHUNK, **how)
    if name == "half kept":  # the keeper counts 1000 bytes per token (resident memory is too coarse here)
        held = [0]
        encoder.register_forward_pre_hook(lambda m, a, kw: held.__setitem__(0, held[0] + 1000 * kw["input_ids"].numel()
                                                                             * torch.is_grad_enabled()), with_kwargs=True)
        step.keeper.bytes_in_use = lambda: held[0]
    out = step(queries, docs)
    cached_calls[name] = calls[0], out.work.kept_chunks
zero(encoder)
calls[0] = 0
# Negative control: without no_sync every re-embedded chunk's backward reduces.
GradCache(ddp, loss_fn, chunk_size=CHUNK, no_sync=contextlib.nullcontext, **CLASSIC)(queries, docs)
unsynced_calls = calls[0]
assert buckets >= 2, f"expected several buckets, got {buckets}"
for name, (count, kept) in cached_calls.items():
    assert count == buckets, f"{name} cached step reduced {count} times for {buckets} buckets"
# 3 + 3 chunks: all kept but the reducing one, none, some (the byte budget keeps a few).
assert [kept for _, kept in cached_calls.values()][:2] == [5, 0], cached_calls
assert 0 < cached_calls["half kept"][1] < 5, cached_calls
assert unsynced_calls > buckets, f"the counter missed per-chunk reductions ({unsynced_calls})"

# 3. Dropout on: each rank replays its own RNG sequence. The reference forwards every rank's
# chunks in one graph, seeding as that rank did, and takes the full-batch loss.
encoder, ddp, calls = wrapped(dropout=0.1)
torch.manual_seed(100 + r)
GradCache(ddp, ContrastiveLoss(), chunk_size=CHUNK)(queries, docs)
reference = tiny_encoder(dropout=0.1, seed=0)
q_parts, d_parts = [], []
for rank in range(W):
    rank_rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    torch.manual_seed(100 + rank)
    for side, parts in ((queries_all, q_parts), (docs_all, d_parts)):
        # The step's own chunks (its texts ordered by length), put back in the batch's order.
        plan = plan_chunks({k: v[rank_rows] for k, v in side.items()}, CHUNK, pack=True)
        order, chunks = plan.order, plan.chunks
        parts.append(torch.cat([reference(**c) for c in chunks])[order.argsort()])
ContrastiveLoss(gather=False)(torch.cat(q_parts), torch.cat(d_parts)).backward()
assert_close(grads(encoder), grads(reference), "dropout replay")
# Kept graphs and re-embedded chunks draw the same masks: the same gradients with dropout on.
for keep in (True, False):
    encoder, ddp, calls = wrapped(dropout=0.1)
    torch.manual_seed(100 + r)
    GradCache(ddp, ContrastiveLoss(), chunk_size=CHUNK, keep_graphs=keep)(queries, docs)
    if keep:
        kept_grads = grads(encoder)
assert_close(grads(encoder), kept_grads, "dropout kept-vs-reembedded")

print(f"rank {r}: gradcache DDP ok ({buckets} buckets; cached (reductions, kept chunks) {cached_calls}, "
      f"unsynced {unsynced_calls} reductions)")
distributed.teardown()
