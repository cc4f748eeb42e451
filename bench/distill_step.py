"""What distillation adds to a training step: GradCache + AdamW with InfoNCE alone, with InfoNCE +
KL, and with InfoNCE + MarginMSE, side by side in one process, steps interleaved (InfoNCE, KL,
MarginMSE, InfoNCE, ...) so that the machine's drift hits all three alike.

A small BERT (h128, 4 layers, random weights), B pairs each with one hard negative (random
tokens: queries 32, documents 128), chunks of 128 rows, fp32 on the CPU (bf16 on a GPU); teacher
scores random. Reported: the median step time of each, and its ratio to InfoNCE alone.

    python bench/distill_step.py                    # B 1024, 3 timed steps each
    python bench/distill_step.py --batch 4096 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import cached_step  # noqa: E402

VARIANTS = {"infonce": None, "infonce + kl": "kl", "infonce + margin_mse": "margin_mse"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shape", default="small", choices=sorted(cached_step.SHAPES))
    args = parser.parse_args()
    from trainer.core.gradcache import GradCache
    from trainer.core.losses import ContrastiveLoss
    from trainer.core.model import Encoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else None
    vocab = cached_step.SHAPES[args.shape]["vocab_size"]
    queries = cached_step.random_tokens(args.batch, 32, vocab, device)
    docs = cached_step.random_tokens(2 * args.batch, 128, vocab, device)  # a positive and a negative per query
    teacher = torch.randn(args.batch, 2, generator=torch.Generator().manual_seed(0)).to(device)
    steps = {}
    for name, distill in VARIANTS.items():
        encoder = Encoder(cached_step.build_backbone(args.shape)).to(device)
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5)
        loss_fn = ContrastiveLoss(distill=distill, teacher_temperature=0.05)
        steps[name] = (GradCache(encoder, loss_fn, chunk_size=args.chunk, autocast_dtype=dtype), optimizer)

    def run(name: str) -> float:
        step, optimizer = steps[name]
        cached_step.sync(device)
        start = time.perf_counter()
        step(queries, docs, teacher_scores=teacher if VARIANTS[name] else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cached_step.sync(device)
        return time.perf_counter() - start

    for name in VARIANTS:  # warm-up: allocator, kernels, optimizer state
        run(name)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.steps):
        for name in VARIANTS:
            times[name].append(run(name))
    base = statistics.median(times["infonce"])
    print(f"{args.shape} BERT, B {args.batch} (1 hard negative each), chunk {args.chunk}, {device}, "
          f"{args.steps} interleaved steps each (median)")
    print("| loss | s / step | pairs/s | x InfoNCE |\n|---|---|---|---|")
    for name in VARIANTS:
        seconds = statistics.median(times[name])
        print(f"| {name} | {seconds:.2f} | {args.batch / seconds:.1f} | {seconds / base:.3f} |")


if __name__ == "__main__":
    main()
