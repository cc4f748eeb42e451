"""Small, fast, randomly initialised models and batches for the tests (nothing is downloaded)."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import re
from pathlib import Path

import yaml

import numpy as np
import torch
from transformers import BertConfig, BertModel

from tests.warm_python import WarmPython
from trainer.core.model import Encoder

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 97


def rounding_atol(updates: int, magnitude: float) -> float:
    """How far a value of about `magnitude` (a loss, a weight) may differ between two runs of
    `updates` AdamW updates whose arithmetic differs only in rounding: the order of a reduction
    over ranks, another library's kernel for the same update.

    Each update may round a weight up to 2 float32 ulp apart (the decayed and the stepped weight).
    The difference then feeds the next steps' gradients: the rounding control of
    tests/dist_scripts/gradcache_zero.py (every weight nudged one ulp per update) drifted weights
    by about 1 ulp per update. So 4 ulp of the magnitude per update (2 for the roundings, 2 for
    what they carry forward), plus one for rounding the value itself. A real fault (another batch,
    a missing or doubled reduction, lost optimizer state) moves these values by 1e-3 or more.
    """
    return 4 * (updates + 1) * float(np.spacing(np.float32(abs(magnitude))))


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


WORDS = [f"w{i}" for i in range(120)]


def word_tokenizer():
    """A BERT-style WordPiece tokenizer over [PAD] [UNK] [CLS] [SEP] [MASK] + WORDS, built with the
    tokenizers library itself (transformers 5 ignores BertTokenizerFast(vocab_file=...), and 4
    does not know its vocab=: this works under both)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )


def write_tiny_model(folder: Path, dropout: float = 0.0, **shape) -> Path:
    """A saved random tiny BERT with a word-level tokenizer: a model folder like any other
    (`shape` overrides BertConfig's sizes, e.g. hidden_size=256)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer()
    assert tokenizer("w12 w13")["input_ids"] == [2, 17, 18, 3]  # the words are in the vocabulary
    tokenizer.save_pretrained(folder)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    config = BertConfig(
        vocab_size=len(WORDS) + 5, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **{**sizes, **shape},
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def decoder_tokenizer():
    """A decoder-style word-level tokenizer (GPT/Qwen-like): no special tokens added, an
    end-of-text token that is also the padding token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<|endoftext|>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        model_max_length=64, padding_side="left",
    )


def write_tiny_decoder(folder: Path) -> Path:
    """A saved random tiny Qwen3 (a decoder LLM, as in Qwen3-Embedding) with decoder_tokenizer()."""
    from transformers import Qwen3Config, Qwen3Model

    folder.mkdir(parents=True, exist_ok=True)
    decoder_tokenizer().save_pretrained(folder)
    config = Qwen3Config(
        vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen3Model(config).save_pretrained(folder)
    return folder


def synthetic_pairs(rows: int, seed: int = 0, negatives: int = 0) -> list[dict]:
    """Queries of 3 words; each positive repeats its query's words among others, so there is
    something to learn. Rows 5 and 6 share a positive text (a real in-batch duplicate)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(rows):
        query = rng.sample(WORDS, 3)
        row = {"query": " ".join(query), "positive": " ".join(query + rng.sample(WORDS, 5))}
        for k in range(1, negatives + 1):
            row[f"negative_{k}"] = " ".join(rng.sample(WORDS, 7))
        out.append(row)
    if rows > 6:
        out[6]["positive"] = out[5]["positive"]
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_beir(folder: Path, rows: list[dict]) -> Path:
    """A BEIR folder whose queries are the rows' queries and whose corpus is their positives."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": r["positive"]} for i, r in enumerate(rows)])
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": r["query"]} for i, r in enumerate(rows)])
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(len(rows))]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of the tests' command-line runs: offline, one thread per process (2 cores)."""
    return dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)


def trainer_command(
    where: list[str], overrides: tuple[str, ...], nproc: int = 1, launcher: list[str] | None = None,
    module: str = "trainer", env_extra: dict | None = None,
) -> tuple[list[str], dict]:
    """The command line and environment that run `python -m trainer` (under torchrun if nproc > 1,
    or under the given launcher, e.g. accelerate launch's arguments up to its -m). module may
    name another entry point, e.g. tests.dist_scripts.faulty_trainer."""
    env = subprocess_env(**(env_extra or {}))
    if module != "trainer":  # the tests package is not installed: let the workers find it
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if launcher is None:
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", module, *where, *overrides], env


_warm_python: WarmPython | None = None


def run_python_module(module: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float):
    """`python -m module args` in cwd with env, as subprocess.run(capture_output=True, text=True)
    would, through the session's warm interpreter (tests/warm_python.py) when it can serve env."""
    global _warm_python
    if _warm_python is None or not _warm_python.serves(env):
        # A new environment (e.g. a library imported by a test set a variable) takes a new server:
        # its first run costs what a plain subprocess costs, the next ones are warm again.
        if _warm_python is not None:
            _warm_python.close()
        _warm_python = WarmPython(env)
    return _warm_python.run(module, args, cwd, env, timeout)


@atexit.register
def _close_warm_python() -> None:
    if _warm_python is not None:
        _warm_python.close()


def run_trainer(
    run_dir: Path,
    *overrides: str,
    nproc: int = 1,
    expect_ok: bool = True,
    timeout: int = 300,
    multirun: bool = False,
    launcher: list[str] | None = None,
    module: str = "trainer",
    env_extra: dict | None = None,
):
    """`python -m trainer` (or under torchrun, or the given launcher) in a subprocess; returns the
    CompletedProcess. With multirun, run_dir is the sweep directory."""
    where = ["-m", f"hydra.sweep.dir={run_dir}"] if multirun else [f"hydra.run.dir={run_dir}"]
    cmd, env = trainer_command(where, overrides, nproc, launcher, module, env_extra)
    if nproc == 1 and launcher is None:
        proc = run_python_module(module, cmd[3:], cwd=run_dir.parent, env=env, timeout=timeout)
    else:
        proc = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def assert_sentence_transformers_matches_encoder(folder: Path) -> None:
    """The saved model, loaded by sentence-transformers, embeds as our Encoder loaded from it does
    (normalised): the export's modules (pooling, normalisation) say what the trainer did."""
    import torch
    from sentence_transformers import SentenceTransformer

    from trainer.core.tokenizer import load_tokenizer

    texts = ["w1 w2 w3", "w7 w8 w9 w10 w11 w12"]
    st_vectors = torch.tensor(SentenceTransformer(str(folder), device="cpu").encode(texts))
    encoder = Encoder.from_pretrained(str(folder)).eval()
    tokenizer = load_tokenizer(str(folder))
    with torch.no_grad():
        ours = torch.nn.functional.normalize(encoder(**tokenizer(texts, padding=True, return_tensors="pt")), dim=-1)
    torch.testing.assert_close(st_vectors, ours, atol=1e-5, rtol=1e-5)


def read_metadata(path: Path) -> dict:
    """A model card's YAML metadata (the block between the first two '---' lines)."""
    match = re.match(r"---\n(.*?)\n---\n", Path(path).read_text(), re.S)
    if match is None:
        raise ValueError(f"{path}: no YAML metadata block at the top")
    return yaml.safe_load(match.group(1))
