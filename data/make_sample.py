"""Make data/debian-sample from the team's Debian descriptions set (../shared/data/debian-descriptions).

    python data/make_sample.py --source ../shared/data/debian-descriptions --train-rows 3000 --dev-queries 400

Train: a seeded random sample of the training pairs. Dev: a seeded sample of the dev queries,
their judged documents and the rest of the dev corpus as distractors (BEIR layout).
"""

import argparse
import gzip
import json
import random
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("../shared/data/debian-descriptions"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "debian-sample")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--dev-queries", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with gzip.open(args.source / "train.jsonl.gz", "rt") as handle:
        rows = handle.readlines()
    sample = sorted(rng.sample(range(len(rows)), args.train_rows))
    args.out.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same sample gives the same bytes.
    with open(args.out / "train.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write("".join(rows[i] for i in sample).encode())

    dev, out_dev = args.source / "dev", args.out / "dev"
    (out_dev / "qrels").mkdir(parents=True, exist_ok=True)
    queries = [json.loads(line) for line in open(dev / "queries.jsonl")]
    keep = {q["_id"] for q in rng.sample(queries, args.dev_queries)}
    with open(out_dev / "queries.jsonl", "w") as handle:
        handle.writelines(json.dumps(q) + "\n" for q in queries if q["_id"] in keep)
    qrels = [line.rstrip("\n").split("\t") for line in open(dev / "qrels" / "test.tsv")]
    with open(out_dev / "qrels" / "test.tsv", "w") as handle:
        handle.write("\t".join(qrels[0]) + "\n")
        handle.writelines("\t".join(row) + "\n" for row in qrels[1:] if row[0] in keep)
    shutil.copy(dev / "corpus.jsonl", out_dev / "corpus.jsonl")
    print(f"{args.train_rows} training pairs, {len(keep)} dev queries over the full dev corpus -> {args.out}")


if __name__ == "__main__":
    main()
