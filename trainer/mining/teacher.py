"""A teacher that scores (query, document) pairs, for distillation and for judging mined negatives.

Two kinds:
  cross_encoder  a transformers sequence-classification model with one output (a
                 sentence-transformers CrossEncoder folder is one): the raw logit of each pair,
                 no sigmoid, since distillation's softmax wants the teacher's own scale
  bi_encoder     an embedder: the cosine of the query's and the document's embeddings
`kind="auto"` reads the folder's config: a *ForSequenceClassification architecture is a
cross-encoder, anything else an embedder.

`score_pairs` shares the pairs out over ranks as embedding does (search.py): batches of pairs
by decreasing length, dealt round-robin, gathered back in input order. A pair lands in the same
batch whatever the number of ranks, so 2 ranks give exactly what 1 rank gives.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from trainer.core import distributed
from trainer.core.embedders import load_embedders
from trainer.core.model import (
    AUTOCAST_DTYPES,
    check_remote_code,
    resolve_device,
    resolve_model_path,
)
from trainer.retrieval.search import gather_rows, plan_by_length

KINDS = ("auto", "cross_encoder", "bi_encoder")


def teacher_kind(path: str, kind: str = "auto") -> str:
    if kind not in KINDS:
        raise ValueError(f"teacher kind must be one of {KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"teacher {path}: no config.json, so its kind cannot be told; set the teacher's kind")
    architectures = json.loads(config.read_text()).get("architectures") or []
    return "cross_encoder" if any(a.endswith("ForSequenceClassification") for a in architectures) else "bi_encoder"


@dataclass
class Teacher:
    """score(queries, docs) -> (n,) float32 scores on the CPU, for n pairs."""

    path: str
    kind: str
    score: Callable[[list[str], list[str]], torch.Tensor]
    device: torch.device

    @classmethod
    def load(cls, name_or_path: str, kind: str = "auto", device: torch.device | None = None, precision: str | None = None,
             max_length: int = 512, query_prefix: str = "", doc_prefix: str = "", trust_remote_code: bool = False) -> Teacher:
        """precision: fp32, bf16 or fp16 autocast; None = bf16 on a GPU, fp32 on a CPU."""
        device = device or torch.device("cpu")
        path = resolve_model_path(name_or_path)
        if not Path(path).exists():
            raise ValueError(f"teacher {name_or_path}: no such model folder or installed model package")
        check_remote_code(path, trust_remote_code)
        kind = teacher_kind(path, kind)
        dtype = AUTOCAST_DTYPES[precision or ("bf16" if device.type == "cuda" else "fp32")]
        if kind == "cross_encoder":
            return cls(path, kind, _cross_encoder(path, device, dtype, max_length, query_prefix, doc_prefix, trust_remote_code), device)
        return cls(path, kind, _bi_encoder(path, device, dtype, max_length, query_prefix, doc_prefix, trust_remote_code), device)


def _cross_encoder(path, device, dtype, max_length, query_prefix, doc_prefix, trust_remote_code):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code).to(device).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"teacher {path}: a cross-encoder with {model.config.num_labels} outputs; one relevance logit "
                         "per pair is needed (num_labels=1)")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    @torch.no_grad()
    def score(queries: list[str], docs: list[str]) -> torch.Tensor:
        inputs = tokenizer([query_prefix + q for q in queries], [doc_prefix + d for d in docs], padding=True,
                           truncation=True, max_length=max_length, return_tensors="pt").to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(**inputs).logits[:, 0].float().cpu()

    return score


def _bi_encoder(path, device, dtype, max_length, query_prefix, doc_prefix, trust_remote_code):
    precision = next(name for name, value in AUTOCAST_DTYPES.items() if value == dtype)
    model = load_embedders(path, device, precision, None, trust_remote_code, (query_prefix, doc_prefix),
                           (max_length, max_length), split_batches=False)

    @torch.no_grad()
    def score(queries: list[str], docs: list[str]) -> torch.Tensor:
        return F.cosine_similarity(model.embed_queries(queries).float(), model.embed_docs(docs).float(), dim=-1).cpu()

    return score


def score_pairs(teacher: Teacher, queries: Sequence[str], docs: Sequence[str], batch_size: int,
                desc: str | None = "teacher scores") -> tuple[np.ndarray, float]:
    """Every pair's score, in input order, on every rank (a collective), and the pairs/s of all
    ranks together. Each rank scores its share of the length-ordered batches."""
    if len(queries) != len(docs):
        raise ValueError(f"{len(queries)} queries for {len(docs)} documents")
    started = time.perf_counter()
    lengths = np.fromiter((len(q) + len(d) for q, d in zip(queries, docs)), dtype=np.int64, count=len(queries))
    plan = plan_by_length(lengths, batch_size, distributed.world_size())
    batches = plan.rank_batches(distributed.rank())
    # On the teacher's device: the gather below is a collective, which NCCL runs on GPUs only.
    local = torch.zeros(sum(len(b) for b in batches), 1, dtype=torch.float32, device=teacher.device)
    start = 0
    with tqdm(total=len(queries), desc=desc, unit=" pairs", disable=desc is None or not distributed.is_main(),
              dynamic_ncols=True) as bar:
        for index in batches:
            scores = teacher.score([queries[i] for i in index], [docs[i] for i in index])
            local[start : start + len(index), 0] = scores.to(local.device)
            start += len(index)
            bar.update(len(index) * distributed.world_size())  # the other ranks move alike
    scores = gather_rows(local, plan, len(queries))[:, 0].cpu().numpy()
    return scores, len(queries) / max(time.perf_counter() - started, 1e-9)


def load_teacher(cfg, device=None) -> Teacher:
    """The teacher a tool's teacher* keys name (TeacherKeys: `score`, `mine`), on device (None = this
    rank's, as cfg.device says)."""
    if not cfg.teacher:
        raise ValueError("teacher is missing: give teacher=PATH (a cross-encoder or an embedder folder)")
    device = device or resolve_device(cfg.device, distributed.read_env().local_rank)
    return Teacher.load(
        cfg.teacher, cfg.teacher_kind.value, device, cfg.teacher_precision.value if cfg.teacher_precision else None,
        cfg.teacher_max_length, cfg.teacher_query_prefix, cfg.teacher_doc_prefix, cfg.teacher_trust_remote_code,
    )
