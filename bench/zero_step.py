"""Time per training step of each backend, side by side: DDP against DeepSpeed ZeRO 1, 2, 3, with
and without optimizer offload, all running the same GradCache step (chunked, one reduction per
step) through the trainer's backends (trainer/backends.py), so the figures are what a run pays.

Every variant runs in a fresh `torchrun` (gloo on CPU, NCCL on GPUs) with the same random BERT,
the same batches and the same AdamW settings; the step is GradCache + backend.step() (clipping,
optimizer, schedule). Reported: median seconds per step over --steps timed steps (after
--warmup), and the ratio to DDP measured in the same invocation.

  python bench/zero_step.py                                   # CPU, 2 ranks, small BERT
  python bench/zero_step.py --nproc 8 --shape bert-base --batch 1024 --chunk 128   # one GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, vocab_size=4000),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522),
}
VARIANTS = {
    "ddp": None,
    "zero1": (1, False),
    "zero2": (2, False),
    "zero3": (3, False),
    "zero2+offload": (2, True),
    "zero3+offload": (3, True),
}


def worker(args) -> None:
    import torch
    from omegaconf import OmegaConf
    from transformers import BertConfig, BertModel

    from trainer.core import distributed
    from trainer.run.backends import create_backend
    from trainer.run.config import Config
    from trainer.run.deepspeed_config import build_config
    from trainer.core.gradcache import GradCache
    from trainer.core.losses import ContrastiveLoss
    from trainer.core.model import Encoder

    env = distributed.init_distributed()
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    cfg = OmegaConf.structured(Config)
    cfg.trainer.lr = 1e-4
    total = args.warmup + args.steps
    torch.manual_seed(0)
    encoder = Encoder(BertModel(BertConfig(max_position_embeddings=512, **SHAPES[args.shape]))).to(device).train()
    per_rank = args.batch // env.world_size
    if VARIANTS[args.variant] is None:
        backend = create_backend("ddp", encoder, device, cfg, total)
    else:
        stage, offload = VARIANTS[args.variant]
        config = build_config(
            zero_stage=stage, offload_optimizer=offload, config_file=None, micro_batch_size=per_rank,
            world_size=env.world_size, max_grad_norm=1.0, precision="fp32", environ={},
        )
        backend = create_backend("deepspeed", encoder, device, cfg, total, config=config)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    step = GradCache(backend.model, ContrastiveLoss(), args.chunk, autocast_dtype=autocast)
    vocab = SHAPES[args.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(env.rank)

    def tokens(length):
        return {
            "input_ids": torch.randint(5, vocab, (per_rank, length), generator=gen).to(device),
            "attention_mask": torch.ones(per_rank, length, dtype=torch.long, device=device),
        }

    times = []
    for i in range(total):
        queries, docs = tokens(args.query_length), tokens(args.doc_length)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(queries, docs)
        backend.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = torch.tensor(statistics.median(times[args.warmup :]))
    seconds = distributed.all_reduce(seconds, torch.distributed.ReduceOp.MAX) if env.world_size > 1 else seconds
    if env.is_main:
        print("RESULT " + json.dumps({"variant": args.variant, "s_per_step": float(seconds)}), flush=True)
    distributed.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=64, help="global pairs per step")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--query-length", type=int, default=16)
    parser.add_argument("--doc-length", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                   ("shape", "batch", "chunk", "query_length", "doc_length", "warmup", "steps")]
    results = {}
    for variant in args.variants:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--worker", f"--variant={variant}", *passthrough]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{variant}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[variant] = json.loads(line.removeprefix("RESULT "))["s_per_step"]
        print(f"{variant:>14}: {results[variant]:.3f} s/step", file=sys.stderr, flush=True)

    base = results.get("ddp")
    print(f"\n{args.nproc} ranks, shape {args.shape}, global batch {args.batch}, chunk {args.chunk}, "
          f"q{args.query_length}/d{args.doc_length}, median of {args.steps} steps\n")
    print("| backend | s/step | x DDP |\n|---|---|---|")
    for variant, seconds in results.items():
        ratio = f"{seconds / base:.2f}" if base else "n/a"
        print(f"| {variant} | {seconds:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
