"""Throughput of one training step over a large batch: our GradCache step against the encoder
floor and against sentence-transformers' CachedMultipleNegativesRankingLoss, side by side.

  floor   the encoder alone: a forward without grad plus a forward/backward over every chunk
          (what any cached step must pay); no loss, no optimizer
  ours    trainer.core.gradcache.GradCache + ContrastiveLoss + AdamW step
  st      sentence-transformers' CachedMNRL + AdamW step, run as its trainer runs it: the loss
          call inside autocast, backward outside (its re-embedding happens in that backward)

Every (method, batch size) runs in a fresh subprocess, so its peak memory is its own (CUDA
max_memory_allocated on a GPU; growth of the process's peak RSS on a CPU). Random weights,
random full-length token ids.

  python bench/cached_step.py --device cpu --shape tiny --batch-sizes 256 512 --chunk 64
  python bench/cached_step.py --device cuda --shape minilm --batch-sizes 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, vocab_size=1000),
    # A small BERT with the real (MiniLM) vocabulary: CPU runs on real text.
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, vocab_size=30522),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522),
}
METHODS = ("floor", "ours", "ours-fixed", "ours-recompute", "st", "st-autocast", "st-tokens", "st-plain")


def build_backbone(shape: str) -> BertModel:
    torch.manual_seed(0)
    # Dropout stays at BERT's default 0.1: it is part of what a training step costs.
    return BertModel(BertConfig(max_position_embeddings=512, **SHAPES[shape]))


def random_tokens(rows: int, length: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows + length)
    return {
        "input_ids": torch.randint(1000 if vocab > 2000 else 5, vocab, (rows, length), generator=gen).to(device),
        "attention_mask": torch.ones(rows, length, dtype=torch.long, device=device),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_floor_step(args, backbone):
    from trainer.core.chunk_plan import plan_chunks
    from trainer.core.model import Encoder

    encoder = Encoder(backbone).to(args.device)
    tokens = getattr(args, "chunk_tokens", None)
    tokens = tokens if isinstance(tokens, int) else None

    def step(queries, docs):
        # What any step must pay: one forward and one backward of every real token, here in our
        # packed chunks (no padding), no loss, no optimizer. A step that re-embeds pays a no-grad
        # forward more; one that keeps its graphs pays this.
        chunks = [c for side in (queries, docs) for c in plan_chunks(side, args.chunk if not tokens else None, tokens, pack=True).chunks]
        with torch.autocast(args.device, dtype=args.dtype, enabled=args.dtype != torch.float32):
            for chunk in chunks:
                encoder(**chunk).pow(2).mean().backward()

    return step


def make_our_step(args, backbone):
    """ours: the library's defaults (packed chunks, graphs kept within the auto memory budget) over
    a token budget (--chunk-tokens, or 'auto' as the trainer probes it); ours-fixed: the step as
    it was, padded chunks of --chunk rows, every chunk re-embedded."""
    from trainer.core.gradcache import GradCache
    from trainer.core.losses import ContrastiveLoss
    from trainer.core.model import Encoder

    encoder = Encoder(backbone).to(args.device)
    autocast = None if args.dtype == torch.float32 else args.dtype
    fixed = getattr(args, "one", "") in ("ours-fixed", "ours-unordered")
    chunk_size, chunk_tokens = (args.chunk, None) if fixed else (None, getattr(args, "chunk_tokens", None) or args.chunk * 128)
    if chunk_tokens == "auto":  # what grad_cache.chunk_tokens=auto does before step 1
        from trainer.core.autochunk import probe_chunk_tokens, training_reserve

        length = getattr(args, "max_length", 128)
        probe = probe_chunk_tokens(encoder, torch.device(args.device), length, args.batch, autocast,
                                   reserve_bytes=training_reserve(encoder, 2 * args.batch))
        chunk_tokens = probe.rows * length
    args.probed_tokens = chunk_tokens
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, fused=args.device == "cuda")
    loss_fn = ContrastiveLoss(temperature=0.05, tile_size=args.tile or None)
    how = dict(pack=False, keep_graphs=False) if fixed else {}
    if getattr(args, "one", "") == "ours-recompute":
        how = dict(keep_graphs=False)
    cached = GradCache(encoder, loss_fn, chunk_size=chunk_size, chunk_tokens=chunk_tokens, autocast_dtype=autocast,
                       sort_by_length=getattr(args, "sort_by_length", True), **how)
    args.last_work = None

    def step(queries, docs):
        args.last_work = cached(queries, docs).work
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _st_model(args, backbone):
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.models import Pooling, Transformer
    except ImportError:  # sentence-transformers >= 6 moved the modules
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertTokenizerFast

    folder = tempfile.mkdtemp(prefix="bench-st-")
    backbone.save_pretrained(folder)
    vocab = Path(folder) / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(100)]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    transformer = Transformer(folder)
    shutil.rmtree(folder)  # loaded: the weights' copy on disk (440 MB at BERT-base) is not needed again
    model = SentenceTransformer(modules=[transformer, Pooling(backbone.config.hidden_size, "mean")], device=args.device)
    model.train()
    return model


def flash_attn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def make_st_step(args, backbone):
    """sentence-transformers' losses, run as its trainer runs them (the loss call inside
    autocast):
      st           CachedMultipleNegativesRankingLoss, mini_batch_size=--chunk, backward outside
                   autocast (its re-embedding then runs in fp32), as shipped;
      st-autocast  the same with backward moved inside autocast (the known fix);
      st-tokens    its best cached configuration: token-packed mini-batches
                   (mini_batch_num_tokens = our token budget) and backward inside autocast;
      st-plain     plain MultipleNegativesRankingLoss (one forward/backward of the whole batch,
                   where it fits), backward inside autocast.
    Its flattened padding-free inputs need flash-attn (DataCollatorWithFlattening); where flash-attn
    is not importable they are not used, and the report says so."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss,
    )

    model = _st_model(args, backbone)
    method = getattr(args, "one", "st")
    if method == "st-plain":
        loss_fn = MultipleNegativesRankingLoss(model, scale=20.0)
    elif method == "st-tokens":
        tokens = getattr(args, "chunk_tokens", None)
        tokens = tokens if isinstance(tokens, int) else args.chunk * 128
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=10**9, mini_batch_num_tokens=tokens)
    else:
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.chunk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.device == "cuda")
    backward_in_autocast = method != "st"

    from trainer.core.chunk_plan import LENGTHS

    def step(queries, docs):
        queries = {k: v for k, v in queries.items() if k != LENGTHS}  # our collate's host-side lengths: not its input
        docs = {k: v for k, v in docs.items() if k != LENGTHS}
        with torch.autocast(args.device, dtype=args.dtype, enabled=args.dtype != torch.float32):
            loss = loss_fn([dict(queries), dict(docs)], labels=None)
            if backward_in_autocast:
                loss.backward()
        if not backward_in_autocast:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


STEP_BUILDERS = {"floor": make_floor_step, "ours": make_our_step, "ours-fixed": make_our_step,
                 "ours-recompute": make_our_step, "ours-unordered": make_our_step, "st": make_st_step,
                 "st-autocast": make_st_step, "st-tokens": make_st_step, "st-plain": make_st_step}


def measure_one(args) -> dict:
    """Runs inside the subprocess: build, warm up, time `steps` steps, report."""
    backbone = build_backbone(args.shape)
    vocab = SHAPES[args.shape]["vocab_size"]
    queries = random_tokens(args.batch, args.q_len, vocab, args.device)
    docs = random_tokens(args.batch, args.d_len, vocab, args.device)
    step = STEP_BUILDERS[args.one](args, backbone)
    step(queries, docs)  # warm-up: allocator, kernels, optimizer state
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(args.steps):
        step(queries, docs)
    sync(args.device)
    seconds = time.perf_counter() - start
    if args.device == "cuda":
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:
        # Peak RSS is a high-water mark of the whole process: report its growth over the timed
        # steps on top of what warm-up already reached (model, optimizer state, one step).
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_gib = max(peak_gib, rss_before / 2**20)
    return {"method": args.one, "batch": args.batch, "pairs_per_s": args.batch * args.steps / seconds, "peak_gib": peak_gib}


def run_subprocess(args, method: str, batch: int) -> dict | None:
    cmd = [sys.executable, __file__, "--one", method, "--batch", str(batch)]
    for key in ("device", "shape", "chunk", "q_len", "d_len", "steps", "tile", "dtype_name"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  {method} B={batch} failed: {' | '.join(tail)}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: minilm on cuda, tiny on cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--chunk", type=int, default=None, help="rows per forward (default 512 on cuda, 64 on cpu)")
    parser.add_argument("--q-len", type=int, default=32)
    parser.add_argument("--d-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tile", type=int, default=8192, help="loss column tile (0 = dense scores)")
    parser.add_argument("--dtype-name", choices=["bf16", "fp32"], default=None, help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--json-out", type=Path, default=None, help="also write the rows as JSON lines")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    args.shape = args.shape or ("minilm" if on_gpu else "tiny")
    args.batch_sizes = args.batch_sizes or ([4096, 8192, 16384, 32768] if on_gpu else [256, 512])
    args.chunk = args.chunk or (512 if on_gpu else 64)
    args.dtype_name = args.dtype_name or ("bf16" if on_gpu else "fp32")
    args.dtype = torch.bfloat16 if args.dtype_name == "bf16" else torch.float32

    if args.one:
        print(json.dumps(measure_one(args)))
        return

    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(
        f"{device_name}; shape {args.shape}; q {args.q_len} / d {args.d_len} tokens; {args.dtype_name}; "
        f"chunk {args.chunk}; loss tile {args.tile or 'dense'}; {args.steps} timed steps after 1 warm-up"
    )
    print(f"{'B':>6} {'method':>6} {'pairs/s':>10} {'peak GiB':>9} {'x floor':>8} {'x st':>6}")
    rows = []
    for batch in args.batch_sizes:
        results = {m: run_subprocess(args, m, batch) for m in args.methods}
        floor, st = results.get("floor"), results.get("st")
        for method, result in results.items():
            if result is None:
                continue
            result["vs_floor"] = result["pairs_per_s"] / floor["pairs_per_s"] if floor else None
            result["vs_st"] = result["pairs_per_s"] / st["pairs_per_s"] if st else None
            rows.append(dict(result, shape=args.shape, device=device_name, chunk=args.chunk))
            fmt = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
            print(
                f"{batch:>6} {method:>6} {result['pairs_per_s']:>10.0f} {result['peak_gib']:>9.2f} "
                f"{fmt(result['vs_floor']):>8} {fmt(result['vs_st']):>6}",
                flush=True,
            )
    if args.json_out:
        args.json_out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
