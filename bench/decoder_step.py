"""A decoder embedder's training step with and without LoRA and gradient checkpointing, side by
side: peak memory and pairs/s of the trainer's GradCache step (last-token pooling, AdamW on what
trains) for a Qwen3 shape with random weights.

Each variant runs in a fresh process, so its peak memory is its own: on a GPU
torch.cuda.max_memory_allocated, on a CPU the process's peak RSS (which includes the Python
runtime, the same for every variant). Reported: medians over --steps timed steps after one
warm-up step, and ratios to the full fine-tune measured in the same invocation.

  python bench/decoder_step.py                                     # CPU: a small Qwen3 shape
  python bench/decoder_step.py --shape qwen3-0.6b --batch 4096 --chunk 128 --seq 128 --bf16   # GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=8000),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
VARIANTS = {"full": (0, False), "full+ckpt": (0, True), "lora": (16, False), "lora+ckpt": (16, True)}


def run_variant(args, device: str | None = None) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from trainer.run.optimizer import trainable_parameters
    from trainer.core.gradcache import GradCache
    from trainer.core.losses import ContrastiveLoss
    from trainer.core.model import Encoder

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    config = Qwen3Config(max_position_embeddings=max(args.seq, 64), **SHAPES[args.shape])
    encoder = Encoder(Qwen3Model(config), pooling="last_token")
    rank, checkpointing = VARIANTS[args.variant]
    if rank:
        encoder.add_lora(rank, 2 * rank)
    if checkpointing:
        encoder.enable_gradient_checkpointing()
    encoder.to(device).train()
    optimizer = torch.optim.AdamW(trainable_parameters(encoder), lr=1e-5)
    step = GradCache(encoder, ContrastiveLoss(), chunk_size=args.chunk,
                     autocast_dtype=torch.bfloat16 if args.bf16 else None)

    def batch(rows: int, seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(args.seq // 4, args.seq + 1, (rows,), generator=gen)
        ids = torch.randint(1, config.vocab_size, (rows, args.seq), generator=gen)
        mask = (torch.arange(args.seq)[None, :] < lengths[:, None]).long()
        return {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}

    times = []
    for i in range(args.steps + 1):
        queries, docs = batch(args.batch, 2 * i), batch(args.batch, 2 * i + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(queries, docs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    trainable = sum(p.numel() for p in trainable_parameters(encoder))
    return {"variant": args.variant, "seconds": statistics.median(times), "peak_gib": peak,
            "trainable": trainable, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--batch", type=int, default=64, help="pairs per step (queries and positives)")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64, help="padded tokens per text")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant and print it as JSON (internal)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{args.shape} on {base['device']}: batch {args.batch}, chunk {args.chunk}, {args.seq} tokens, "
          f"{'bf16' if args.bf16 else 'fp32'}; medians of {args.steps} steps")
    print(f"{'variant':<11} {'trainable':>12} {'pairs/s':>9} {'peak GiB':>9} {'speed':>7} {'memory':>7}")
    for row in rows:
        pairs = args.batch / row["seconds"]
        print(f"{row['variant']:<11} {row['trainable']:>12,} {pairs:>9.1f} {row['peak_gib']:>9.2f} "
              f"{base['seconds'] / row['seconds']:>6.2f}x {row['peak_gib'] / base['peak_gib']:>6.2f}x")


if __name__ == "__main__":
    main()
