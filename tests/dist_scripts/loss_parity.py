"""Under torchrun (2 ranks): each preset's gathered loss (with and without Matryoshka sizes) equals the single-process loss on the
concatenated batch, and its gradients after DDP-style averaging equal the full-batch gradients.
Duplicated texts sit on different ranks, so duplicate masking must work across the gather."""

import itertools

import torch

from tests.test_losses import embeddings
from trainer.core import distributed
from trainer.core.losses import PRESETS, ContrastiveLoss

env = distributed.init_distributed()
W, r = env.world_size, env.rank
LOCAL, N_NEG = 4, 2
GLOBAL = LOCAL * W

q_all, docs_all = embeddings(b=GLOBAL, n=N_NEG, dtype=torch.float64, seed=11)
query_hashes = torch.arange(GLOBAL) + 1000
doc_hashes = torch.arange(GLOBAL * (1 + N_NEG)).view(GLOBAL, 1 + N_NEG)
# Across ranks: row 1 (rank 0) and row 6 (rank 1) share a positive; rows 2 and 5 share a query;
# row 7's second hard negative is row 0's positive.
doc_hashes[6, 0] = doc_hashes[1, 0]
docs_all[6, 0] = docs_all[1, 0]
query_hashes[5] = query_hashes[2]
q_all[5] = q_all[2]
doc_hashes[7, 2] = doc_hashes[0, 0]
docs_all[7, 2] = docs_all[0, 0]

rows = slice(r * LOCAL, (r + 1) * LOCAL)
checked = 0
for preset, tile_size, mask_duplicates, margin, dims in itertools.product(
    sorted(PRESETS), [None, 5], [False, True], [None, 0.1], [None, (16, 8, 4)]
):
    options = dict(tile_size=tile_size, mask_duplicates=mask_duplicates, false_negative_margin=margin,
                   matryoshka_dims=dims)
    hashes = dict(query_hashes=query_hashes, doc_hashes=doc_hashes) if mask_duplicates else {}
    local_hashes = {k: v[rows] for k, v in hashes.items()}

    q = q_all[rows].clone().requires_grad_()
    docs = docs_all[rows].clone().requires_grad_()
    loss = ContrastiveLoss.from_preset(preset, **options)(q, docs, **local_hashes)
    loss.backward()

    q_ref = q_all.clone().requires_grad_()
    docs_ref = docs_all.clone().requires_grad_()
    ref = ContrastiveLoss.from_preset(preset, gather=False, **options)(q_ref, docs_ref, **hashes)
    ref.backward()

    name = f"{preset} tile={tile_size} dup={mask_duplicates} margin={margin} matryoshka={dims}"
    mean_loss = distributed.all_reduce_mean(loss)
    torch.testing.assert_close(mean_loss, ref.detach(), atol=1e-10, rtol=0, msg=name)
    # DDP averages parameter gradients over ranks: the embedding gradient it implies is grad / W.
    torch.testing.assert_close(q.grad / W, q_ref.grad[rows], atol=1e-10, rtol=0, msg=name)
    torch.testing.assert_close(docs.grad / W, docs_ref.grad[rows], atol=1e-10, rtol=0, msg=name)
    # And the per-rank loss is not trivially the global one (each rank has its own rows).
    checked += 1

print(f"rank {r}: {checked} loss configurations match the single-process loss and gradients")
distributed.teardown()
