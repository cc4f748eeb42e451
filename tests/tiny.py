"""Small, fast, randomly initialised models and batches for the tests (nothing is downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from trainer.model import Encoder

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 97


def tiny_encoder(dropout: float = 0.0, seed: int = 0, pooling: str = "mean") -> Encoder:
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    return Encoder(BertModel(config), pooling=pooling)


def token_batch(rows: int, max_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded random token ids of varied lengths (some rows use the full width)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (rows,), generator=gen)
    lengths[0] = max_len
    input_ids = torch.randint(1, VOCAB_SIZE, (rows, max_len), generator=gen)
    attention_mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> str:
    """Run tests/dist_scripts/<script> under torchrun (gloo); fail the test with its output."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "tests" / "dist_scripts" / script), *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} failed (exit {proc.returncode}):\n{output[-6000:]}"
    return output
