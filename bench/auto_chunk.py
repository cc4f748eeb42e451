"""How good the automatic chunk budget is, on a CPU under a real memory limit (RLIMIT_AS).

For each limit (MiB the process may grow past its size once the model exists), in a fresh
subprocess:
  probe      grad_cache.chunk_tokens=auto's probe (trainer/core/autochunk.py): rows of the longest texts
  largest    the largest row count whose forward + backward really fits, found by bisection
             (every try a real allocation; a failure is a real "can't allocate memory")
  fixed      a GradCache step over the whole batch in one chunk: fails under the limit
  auto       the same step with the probed budget and recovery on: completes; its loss and
             gradients against a small fixed chunk's, computed before the limit was set
A wide tiny BERT (hidden 256, 2 layers), texts of 64 tokens, a batch of 512 pairs, dropout off.
glibc's mmap threshold is fixed, so freed blocks leave the address space, and oneDNN's primitive
cache is off, so that a failed large primitive's memory is not kept (see tests/test_autochunk.py).

    python bench/auto_chunk.py                       # limits 150, 300, 600 MiB
    python bench/auto_chunk.py --limits-mib 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ROWS, LENGTH = 512, 64


def measure(limit_mib: int) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    from tests.tiny import token_batch
    from trainer.core.autochunk import AdaptiveStep, _random_rows, _try, probe_chunk_tokens
    from trainer.core.gradcache import GradCache
    from trainer.core.losses import ContrastiveLoss
    from trainer.core.memory import _proc_status, is_out_of_memory, release
    from trainer.core.model import Encoder

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    encoder = Encoder(BertModel(config))
    queries, docs = token_batch(ROWS, LENGTH, seed=1), token_batch(ROWS, LENGTH, seed=2)
    small = GradCache(encoder, ContrastiveLoss(), chunk_size=16)(queries, docs)  # the reference, unlimited
    reference_grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    for p in encoder.parameters():
        p.grad = None
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_proc_status("VmSize") + (limit_mib << 20), hard))
    cpu = torch.device("cpu")

    probe = probe_chunk_tokens(encoder, cpu, LENGTH, cap_rows=2 * ROWS)

    def trial(rows: int) -> None:
        encoder(**_random_rows(rows, LENGTH, config.vocab_size, cpu)).float().pow(2).sum().backward()
        for p in encoder.parameters():
            p.grad = None

    low, high = 0, 2 * ROWS + 1  # low fits (0 trivially), high does not (or is past the cap)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if _try(trial, mid, cpu)[0] else (low, mid)

    try:
        GradCache(encoder, ContrastiveLoss(), chunk_tokens=ROWS * LENGTH)(queries, docs)
        fixed = "completed"
    except Exception as err:
        fixed = "out of memory" if is_out_of_memory(err) else f"{type(err).__name__}: {err}"
    for p in encoder.parameters():
        p.grad = None
    release(cpu)  # what a run does after any out-of-memory error
    step = AdaptiveStep(GradCache(encoder, ContrastiveLoss(), chunk_tokens=probe.rows * LENGTH, recover_oom=True),
                        cpu, say=lambda _: None)
    out = step(queries, docs)
    grad_diff = max(float((p.grad - reference_grads[n]).abs().max()) for n, p in encoder.named_parameters())
    return {"limit_mib": limit_mib, "probe_rows": probe.rows, "largest_rows": low, "largest_over_probe": low / max(probe.rows, 1),
            "whole_batch_fixed": fixed, "auto_retries": len(step.changes), "auto_final_tokens": step.budget,
            "auto_loss_diff": abs(float(out.loss) - float(small.loss)), "auto_grad_diff": grad_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limits-mib", type=int, nargs="+", default=[150, 300, 600])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one)))
        return
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1",
               ONEDNN_PRIMITIVE_CACHE_CAPACITY="0")
    rows = []
    for limit in args.limits_mib:
        proc = subprocess.run([sys.executable, __file__, "--one", str(limit)], capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            print(f"limit {limit} MiB failed: {(proc.stderr or proc.stdout)[-800:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1]))
    print(f"auto chunk budget under RLIMIT_AS; BERT h256 x2, {LENGTH}-token texts, {ROWS} pairs, CPU")
    print(f"{'limit MiB':>9} {'probe rows':>10} {'largest rows':>12} {'largest/probe':>13} {'whole batch':>14} "
          f"{'auto retries':>12} {'auto vs chunk 16: loss, grad':>30}")
    for r in rows:
        print(f"{r['limit_mib']:>9} {r['probe_rows']:>10} {r['largest_rows']:>12} {r['largest_over_probe']:>13.2f} "
              f"{r['whole_batch_fixed']:>14} {r['auto_retries']:>12} {r['auto_loss_diff']:>14.1e} {r['auto_grad_diff']:>15.1e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
