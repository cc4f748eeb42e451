"""What an exported model's max_seq_length is worth to its users: the model loaded with
SentenceTransformer(path), scored by sentence-transformers' own InformationRetrievalEvaluator on a
BEIR folder, at the length the export states and at the training's document length, side by side.

    python bench/export_length.py outputs/<run>/model [--data data/debian-sample/dev] [--train-length 128]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.eval.beir import load_beir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/debian-sample/dev"))
    parser.add_argument("--train-length", type=int, default=128, help="the training's model.doc_max_length")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    data = load_beir(args.data)
    corpus = dict(zip(data.corpus_ids, data.corpus_texts))
    queries = dict(zip(data.query_ids, data.query_texts))
    relevant = {q: {d for d, g in docs.items() if g > 0} for q, docs in data.qrels.items()}
    model = SentenceTransformer(str(args.model), device="cpu")
    exported = json.loads((args.model / "sentence_bert_config.json").read_text())["max_seq_length"]
    print(f"{args.model}: exported max_seq_length {exported}; {len(queries)} queries, {len(corpus)} documents")
    print("| max_seq_length | NDCG@10 (sentence-transformers' evaluator) |")
    print("|---|---:|")
    for length in sorted({args.train_length, exported}):
        model.max_seq_length = length
        evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, name="dev", ndcg_at_k=[10], show_progress_bar=False)
        score = evaluator(model)
        ndcg = next(v for k, v in score.items() if k.endswith("cosine_ndcg@10"))
        print(f"| {length}{' (exported)' if length == exported else ''} | {ndcg:.4f} |")


if __name__ == "__main__":
    main()
