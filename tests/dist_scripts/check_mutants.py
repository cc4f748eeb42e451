"""trainer.check on the ranks torchrun starts (tests/test_check.py), once per entry of a JSON list
of {"mutation": NAME, "overrides": [...]}. A mutation is patched in for its run alone, at the very
functions the loss and GradCache call: a hook only these tests use, never a user option. Rank 0
prints one line per run: CHECK {"mutation", "ok", "failures", "exactness"}."""

import contextlib
import dataclasses
import json
import sys
from unittest import mock

import torch
from torch.nn.parallel import DistributedDataParallel

from trainer.core import distributed, losses
from trainer.tools.check import run_check

original_gather, original_layout = distributed.gather_with_grad, losses.gather_global_batch


def gather_dropping_gradient(tensor):
    """Every rank's rows, but only this rank's own keep their graph: the other ranks' use of them
    as columns sends no gradient back (all_gather without autograd, own slice put back)."""
    rank, rows = distributed.rank(), tensor.shape[0]
    everyone = distributed.gather_no_grad(tensor.detach())
    return torch.cat([everyone[: rank * rows], tensor, everyone[(rank + 1) * rows :]])


class _TimesWorld(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * distributed.world_size()


def gather_scaled(tensor):
    """The gather with its gradient multiplied by the world size (a mean where a sum belongs, or
    the reverse, in the other direction)."""
    return original_gather(_TimesWorld.apply(tensor))


def layout_by_row(q, docs, *args, **kwargs):
    """Document columns laid out row by row (row g's slots together) where the loss's targets and
    masks expect slot by slot (column c * N + g)."""
    batch = original_layout(q, docs, *args, **kwargs)
    slots, rows = docs.shape[1], batch.num_rows
    columns = batch.doc_columns.view(slots, rows, -1).transpose(0, 1).reshape(slots * rows, -1)
    hashes = None if batch.doc_col_hash is None else batch.doc_col_hash.view(slots, rows).t().reshape(-1)
    return dataclasses.replace(batch, doc_columns=columns, doc_col_hash=hashes)


MUTATIONS = {
    "none": [],
    "gather-drops-gradient": [lambda: mock.patch.object(distributed, "gather_with_grad", gather_dropping_gradient)],
    "gather-scaled": [lambda: mock.patch.object(distributed, "gather_with_grad", gather_scaled)],
    "negatives-misordered": [lambda: mock.patch.object(losses, "gather_global_batch", layout_by_row)],
    "reduce-per-chunk": [lambda: mock.patch.object(DistributedDataParallel, "no_sync", lambda self: contextlib.nullcontext())],
}

for entry in json.loads(sys.argv[1]):
    with contextlib.ExitStack() as stack:
        for patch in MUTATIONS[entry["mutation"]]:
            stack.enter_context(patch())
        report = run_check(entry["overrides"])
    if distributed.is_main():
        print("CHECK " + json.dumps({"mutation": entry["mutation"], "ok": report["ok"], "failures": report["failures"],
                                     "exactness": report["exactness"], "backend": report["backend"]}, default=str),
              flush=True)
distributed.teardown()
