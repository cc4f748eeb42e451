"""Train a tiny random BERT for a few cached steps in a plain PyTorch loop (no Hydra, no data files).

    python examples/own_loop.py

Under `torchrun --nproc_per_node=N examples/own_loop.py` the same code gathers every rank's
embeddings into one global batch and reduces gradients once per step.
"""

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertModel

from trainer.core import distributed
from trainer.core.gradcache import GradCache
from trainer.core.losses import ContrastiveLoss
from trainer.core.model import Encoder

env = distributed.init_distributed()
torch.manual_seed(0)
config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
encoder = Encoder(BertModel(config), pooling="mean")
model = DistributedDataParallel(encoder) if env.world_size > 1 else encoder
optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-3)
step = GradCache(model, ContrastiveLoss.from_preset("infonce", temperature=0.05), chunk_size=16)


def batch(rows, length, seed):
    """Random token ids; each query's positive is a noisy copy of it, so there is signal to learn."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randint(1, 500, (rows, length), generator=gen)
    docs = torch.where(torch.rand(rows, length, generator=gen) < 0.7, queries, torch.randint(1, 500, (rows, length), generator=gen))
    mask = torch.ones(rows, length, dtype=torch.long)
    return {"input_ids": queries, "attention_mask": mask}, {"input_ids": docs, "attention_mask": mask}


for i in range(20):
    queries, docs = batch(64, 16, seed=i * env.world_size + env.rank)  # 64 pairs per rank
    out = step(queries, docs)  # pass 1, loss on the global batch, pass 2: gradients are in .grad
    optimizer.step()
    optimizer.zero_grad()
    if env.is_main and i % 5 == 4:
        print(f"step {i + 1}: loss {out.loss.item():.3f}  in-batch accuracy {out.stats.accuracy.item():.2f}")
distributed.teardown()
