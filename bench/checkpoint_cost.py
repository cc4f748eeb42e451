"""What verified checkpoints cost, side by side in one process: saving a DDP checkpoint (model,
AdamW state, RNG) with its manifest against the same save without one (and without the fsync
that the manifest's hashing does, so the files may still sit in the page cache), and verifying
it on resume against loading it. The state is a random BERT of the given shape with AdamW's
two moments filled in, as the trainer's DDPBackend writes it.

  python bench/checkpoint_cost.py                        # MiniLM's shape
  python bench/checkpoint_cost.py --shape bert-base

One process hashes everything here; under torchrun each of W ranks hashes 1/W of the files.
Figures are medians over --repeats; the page cache is warm (the files were just written), as
it is when a run saves and, on a restart, usually when it verifies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="minilm")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import BertConfig, BertModel

    from trainer.core.model import Encoder
    from trainer.core.rng import RngState
    from trainer.run import checkpoint, manifest

    encoder = Encoder(BertModel(BertConfig(**SHAPES[args.shape])))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    for p in encoder.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # fills exp_avg and exp_avg_sq

    def save_state(folder: Path) -> None:
        torch.save(encoder.state_dict(), folder / "model.pt")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def save_without_manifest(run_dir: Path, step: int) -> None:
        folder = run_dir / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        torch.save(RngState(every_generator=True).to_dict(), folder / "rng-rank0.pt")
        save_state(folder)

    def load(folder: Path) -> None:
        encoder.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))

    def fsync_all(run_dir: Path, step: int) -> None:
        for path in (run_dir / "checkpoints" / f"step-{step}").iterdir():
            with path.open("rb") as f:
                os.fsync(f.fileno())

    times: dict[str, list[float]] = {k: [] for k in ("save", "save+fsync", "save+manifest", "load", "verify")}
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(1, args.repeats + 1):
            run_dir = Path(tmp) / f"r{step}"
            start = time.perf_counter()
            save_without_manifest(run_dir, step)
            times["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            fsync_all(run_dir, step)
            times["save+fsync"].append(times["save"][-1] + time.perf_counter() - start)
            start = time.perf_counter()
            saved = checkpoint.save(run_dir, checkpoint.TrainerState(step=step + 1), save_state, keep=100)
            times["save+manifest"].append(time.perf_counter() - start)
            start = time.perf_counter()
            load(saved)
            times["load"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert manifest.problem(saved) is None
            times["verify"].append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in saved.iterdir()) / 2**20

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.shape}: checkpoint of {size:.0f} MiB, medians of {args.repeats}")
    print(f"  save without manifest  {med['save']:.3f} s")
    print(f"  save, then fsync       {med['save+fsync']:.3f} s  ({med['save+fsync'] / med['save']:.2f}x)")
    print(f"  save with manifest     {med['save+manifest']:.3f} s  ({med['save+manifest'] / med['save']:.2f}x; "
          "fsync + SHA-256 of every file)")
    print(f"  load                   {med['load']:.3f} s")
    print(f"  verify before loading  {med['verify']:.3f} s  ({med['verify'] / med['load']:.2f}x the load; "
          f"{size / med['verify']:.0f} MiB/s)")


if __name__ == "__main__":
    main()
