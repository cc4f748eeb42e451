"""Peak memory of the loss stage (forward + backward), dense scores against tiled scores.

Each measurement runs in a fresh subprocess; on a CPU it reports how far the process's peak RSS
rose above what it held once the inputs existed, on a GPU torch.cuda.max_memory_allocated above
the inputs. Single process: the whole batch is local rows, the worst case for one rank.

  python bench/loss_memory.py --batch-sizes 8192 16384 --dim 384
  python bench/loss_memory.py --json --batch-sizes 8192 --presets infonce   # one JSON line per row
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> int:
    """Reset the kernel's high-water mark of resident memory (VmHWM) to the current RSS, and return
    that: the peak read afterwards is the measured work's alone. (ru_maxrss cannot be reset, so a
    transient peak before the work, e.g. while importing, hid part of the work's rise: the dense
    loss once measured 460 MiB instead of about 1 GiB.)"""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def measure(batch: int, dim: int, negatives: int, preset: str, tile: int, device: str) -> dict:
    sys.path.insert(0, str(REPO))
    from trainer.core.losses import ContrastiveLoss

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, dim, generator=gen).to(device).requires_grad_()
    docs = torch.randn(batch, 1 + negatives, dim, generator=gen).to(device).requires_grad_()
    loss_fn = ContrastiveLoss.from_preset(preset, tile_size=tile or None)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _reset_peak_rss() if device != "cuda" else 0
    start = time.perf_counter()
    loss_fn(q, docs).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base_rss
    return {
        "batch": batch, "dim": dim, "negatives": negatives, "preset": preset, "tile": tile,
        "peak_mib": peak / 2**20, "seconds": time.perf_counter() - start,
    }


def measure_in_subprocess(**kwargs) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(kwargs)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--negatives", type=int, default=0)
    parser.add_argument("--presets", nargs="+", default=["infonce", "gte"])
    parser.add_argument("--tile", type=int, default=1024, help="tile size of the tiled variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return
    if not args.json:
        print(f"{'preset':>8} {'B':>6} {'dense MiB':>10} {'tiled MiB':>10} {'ratio':>6} {'dense s':>8} {'tiled s':>8}")
    for preset in args.presets:
        for batch in args.batch_sizes:
            common = dict(batch=batch, dim=args.dim, negatives=args.negatives, preset=preset, device=args.device)
            dense = measure_in_subprocess(tile=0, **common)
            tiled = measure_in_subprocess(tile=args.tile, **common)
            if args.json:
                print(json.dumps(dense)), print(json.dumps(tiled))
                continue
            print(
                f"{preset:>8} {batch:>6} {dense['peak_mib']:>10.0f} {tiled['peak_mib']:>10.0f} "
                f"{dense['peak_mib'] / max(tiled['peak_mib'], 1e-9):>6.1f} {dense['seconds']:>8.2f} {tiled['seconds']:>8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
