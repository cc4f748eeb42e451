"""Peak memory of retrieval evaluation on a large synthetic corpus: the old dense evaluation
(every embedding on one rank, the whole query x corpus score matrix, then top-10) against the
sharded, chunked one in trainer/eval/evaluate.py. Both see the same texts and the same random model
and must give the same figures.

Each method runs in a fresh subprocess, which reports its peak RSS (CPU) or
torch.cuda.max_memory_allocated (GPU), its time, and the metrics. The model is a random BERT of
MiniLM's width (384) with one layer and short texts, so that embedding 200K documents on a CPU
takes about a minute; the search, the part that differs, is what a real model would cost.

  python bench/eval_memory.py --docs 200000 --queries 5000
  torchrun --nproc_per_node=2 bench/eval_memory.py --worker sharded --docs 200000 --queries 5000   # per-rank figures
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthetic_set(docs: int, queries: int, seed: int = 0):
    """Documents of 8 random words; query i is 3 words of document i (judged relevant)."""
    from trainer.eval.beir import BeirSet

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(120)]
    corpus = [" ".join(rng.choices(words, k=8)) for _ in range(docs)]
    query_texts = [" ".join(corpus[i].split()[:3]) for i in range(queries)]
    return BeirSet(
        corpus_ids=[f"d{i}" for i in range(docs)],
        corpus_texts=corpus,
        query_ids=[f"q{i}" for i in range(queries)],
        query_texts=query_texts,
        qrels={f"q{i}": {f"d{i}": 1} for i in range(queries)},
    )


def model_folder(root: Path) -> Path:
    from transformers import BertConfig, BertModel

    from tests.tiny import word_tokenizer

    folder = root / "model"
    if not folder.exists():
        word_tokenizer().save_pretrained(folder)
        config = BertConfig(vocab_size=125, hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                            intermediate_size=1536, max_position_embeddings=64)
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
    return folder


def worker(method: str, folder: Path, docs: int, queries: int, batch_size: int) -> dict:
    import torch.nn.functional as F

    from trainer.core import distributed
    from trainer.eval.evaluate import evaluate, ranking_metrics
    from trainer.core.embedders import text_embedder
    from trainer.core.model import Encoder, resolve_device
    from trainer.core.tokenizer import load_tokenizer

    distributed.init_distributed()
    device = resolve_device("auto", distributed.read_env().local_rank)
    data = synthetic_set(docs, queries)
    encoder = Encoder.from_pretrained(str(folder)).to(device).eval()
    embed = text_embedder(encoder, load_tokenizer(str(folder)), "", 32, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if method == "dense":  # what evaluation did before: everything on one rank, one score matrix
        with torch.no_grad():
            def embed_all(texts):
                order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
                out = torch.empty((len(texts), encoder.dim), device=device)
                for s in range(0, len(order), batch_size):
                    index = order[s : s + batch_size]
                    out[torch.tensor(index, device=device)] = F.normalize(embed([texts[i] for i in index]).float(), dim=-1)
                return out

            q, d = embed_all(data.query_texts), embed_all(data.corpus_texts)
            result = ranking_metrics((q @ d.T).topk(10, dim=1).indices.tolist(), data)
    else:
        result = evaluate(embed, embed, data, batch_size)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    distributed.teardown()
    return {"method": method, "rank": distributed.read_env().rank, "peak_gib": peak / 2**30, "seconds": seconds, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["dense", "sharded"])
    parser.add_argument("--worker", choices=["dense", "sharded"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder = args.model or model_folder(Path(tempfile.mkdtemp()))
        print(json.dumps(worker(args.worker, folder, args.docs, args.queries, args.batch_size)), flush=True)
        return
    root = Path(tempfile.mkdtemp())
    folder = model_folder(root)
    rows = []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--worker", method, "--model", str(folder), "--docs", str(args.docs),
               "--queries", str(args.queries), "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.docs} documents, {args.queries} queries, dim 384, {device}; peak = memory above the process's start\n")
    print("| method | peak GiB | seconds | ndcg@10 | recall@10 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['peak_gib']:.2f} | {r['seconds']:.1f} | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} |")
    if len(rows) == 2:
        same = all(abs(rows[0][k] - rows[1][k]) < 1e-9 for k in ("ndcg@10", "recall@10", "mrr@10"))
        print(f"\nsame figures: {same}; peak ratio dense / sharded: {rows[0]['peak_gib'] / max(rows[1]['peak_gib'], 1e-9):.1f}x")


if __name__ == "__main__":
    main()
