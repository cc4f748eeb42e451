"""The tools' configurations (conf/tools/*.yaml): typed dataclasses, one docstring per field,
registered with Hydra like the training schema (trainer/run/config.py), whose model settings
they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.run.config import ModelConfig, Pooling, Precision


@dataclass
class EvaluateConfig:
    """`python -m trainer.evaluate` (conf/tools/evaluate.yaml)."""

    model: str = MISSING
    """The model to evaluate: a saved folder (e.g. a run's model/), an installed model package or
    a hub name."""
    data: str = MISSING
    """A BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    split: str = "test"
    """Which qrels file: qrels/<split>.tsv."""
    pooling: Optional[Pooling] = None
    """mean, cls or last_token; None = the saved model's own (else mean)."""
    trust_remote_code: bool = False
    """Run the Python code a model folder ships (its config's auto_map); off = refuse it."""
    query_prefix: str = ""
    """Prepended to every query (as in training: model.query_prefix)."""
    doc_prefix: str = ""
    """Prepended to every document (as in training: model.doc_prefix)."""
    query_max_length: int = 32
    """Queries are truncated to this many tokens (as in training)."""
    doc_max_length: int = 128
    """Documents are truncated to this many tokens (as in training)."""
    batch_size: Union[int, str] = 128
    """Texts per forward pass. auto: the largest batch of max-length texts whose forward fits
    (probed first, the smallest over ranks); a batch that runs out of memory anyway is embedded
    in two halves."""
    precision: Precision = Precision.fp32
    """fp32, or autocast in bf16 / fp16."""
    device: str = "auto"
    """auto, cpu or cuda (each rank its own GPU under torchrun)."""
    output: Optional[str] = None
    """Also write the figures to this JSON file."""


class CalibrationMethod(str, Enum):
    platt = "platt"
    isotonic = "isotonic"


@dataclass
class CalibrateConfig(EvaluateConfig):
    """`python -m trainer.calibrate` (conf/tools/calibrate.yaml); the model settings are evaluate's,
    and `split` is the qrels file the calibration is fitted on."""

    method: CalibrationMethod = CalibrationMethod.platt
    """platt: a logistic curve in the cosine (two parameters, smooth); isotonic: a monotone step
    function (no assumed shape, needs more judged pairs)."""
    check_split: Optional[str] = None
    """Check the fit on qrels/<check_split>.tsv; None = cross-validate over the queries of `split`."""
    folds: int = 5
    """Without check_split: each fold's pairs are mapped by a calibration fitted on the other folds
    (the figures printed); the calibration saved is fitted on every pair."""
    bins: int = 10
    """Equal-width probability bins of the ECE and of the reliability diagram."""
    calibration_dir: Optional[str] = None
    """Where calibration.json and calibration.png go; None = the model's folder (model must then be
    a saved folder, whose README.md card gets the figures too)."""


class Retriever(str, Enum):
    bm25 = "bm25"
    dense = "dense"
    hybrid = "hybrid"


class Bm25Backend(str, Enum):
    auto = "auto"
    numpy = "numpy"
    numba = "numba"


class PoolDtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"


class DenseSearch(str, Enum):
    exact = "exact"
    faiss = "faiss"


class NegativeSampling(str, Enum):
    top = "top"
    random = "random"


class TeacherKind(str, Enum):
    auto = "auto"
    cross_encoder = "cross_encoder"
    bi_encoder = "bi_encoder"


class FilterBy(str, Enum):
    student = "student"
    teacher = "teacher"


@dataclass
class TeacherKeys:
    """The teacher of `python -m trainer.score` and `python -m trainer.mine teacher=PATH`."""

    teacher: Optional[str] = None
    """The teacher: a model folder or installed model package (a cross-encoder, or an embedder)."""
    teacher_kind: TeacherKind = TeacherKind.auto
    """cross_encoder (a sequence-classification model with one output: its raw logit), bi_encoder
    (an embedder: the cosine), or auto (a *ForSequenceClassification architecture is a cross-encoder)."""
    teacher_batch_size: int = 64
    """Pairs per forward pass of the teacher."""
    teacher_max_length: int = 512
    """Tokens per pair (cross-encoder) or per text (bi-encoder); longer ones are truncated."""
    teacher_precision: Optional[Precision] = None
    """fp32, bf16 or fp16; null = bf16 on a GPU, fp32 on a CPU."""
    teacher_query_prefix: str = ""
    """Prepended to every query the teacher reads."""
    teacher_doc_prefix: str = ""
    """Prepended to every document the teacher reads."""
    teacher_trust_remote_code: bool = False
    """Run the Python code the teacher's folder ships (its config's auto_map); off = refuse it."""


@dataclass
class ScoreConfig(TeacherKeys):
    """`python -m trainer.score` (conf/tools/score.yaml): a teacher's scores of every row's
    [positive] + negatives, added to the rows as `scores`."""

    input: str = MISSING
    """Rows with hard negatives, in any format data.train reads."""
    output: str = MISSING
    """Where the scored rows go: .jsonl, .jsonl.gz or .parquet. Never overwritten unless overwrite=true."""
    overwrite: bool = False
    """Replace an existing output file."""
    query_column: str = "query"
    """Column holding the query text."""
    positive_column: str = "positive"
    """Column holding the positive document text."""
    negatives_column: str = "negatives"
    """A list column of hard-negative texts."""
    negative_prefix: str = "negative_"
    """Hard negatives as columns negative_1 .. negative_n."""
    device: str = "auto"
    """auto, cpu or cuda (each rank its own GPU under torchrun)."""


@dataclass
class MineConfig(TeacherKeys):
    """`python -m trainer.mine` (conf/tools/mine.yaml): hard negatives for training pairs."""

    input: str = MISSING
    """Training pairs, in any format data.train reads (.jsonl, .jsonl.gz, .parquet, .csv, a
    save_to_disk folder, a hub name)."""
    output: str = MISSING
    """Where the mined rows go: .jsonl, .jsonl.gz or .parquet. Never overwritten unless overwrite=true."""
    overwrite: bool = False
    """Replace an existing output file."""
    corpus: Optional[Any] = None
    """More candidate documents besides the input's positives: a BEIR corpus.jsonl ({title, text}),
    a .jsonl of {text}, a .txt file (one document per line), or a list of these."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The embedder that retrieves (dense, hybrid) and scores every candidate for the filter."""
    retriever: Retriever = Retriever.hybrid
    """bm25 (lexical, the bm25s package), dense (the model), or hybrid (both, fused by reciprocal rank)."""
    num_negatives: int = 5
    """Negatives per output row; rows with fewer survivors are dropped (and counted)."""
    range_min: int = 0
    """Skip the first range_min candidates of each query (the likeliest unlabelled positives)."""
    range_max: int = 100
    """Consider candidates up to this rank. Ranks count after removing the query's own positives
    and the query text."""
    max_score_ratio: Optional[float] = 0.95
    """Drop a candidate whose cosine with the query exceeds this times the positive's (NV-Retriever's
    TopK-PercPos); null = off."""
    margin: Optional[float] = None
    """Also drop a candidate whose cosine exceeds the positive's minus this margin; null = off."""
    filter_by: FilterBy = FilterBy.student
    """Whose scores the filter judges by: the student model's cosine, or the teacher's scores (needs
    teacher; every candidate is then scored by it). A cross-encoder's raw logits can be negative:
    use margin with them rather than max_score_ratio."""
    sampling: NegativeSampling = NegativeSampling.top
    """top: the best-ranked survivors; random: a seeded random choice among them (kept in rank order)."""
    seed: int = 42
    """Seeds sampling=random."""
    rrf_k: int = 60
    """Reciprocal rank fusion constant: a candidate scores the sum of 1 / (rrf_k + rank) over retrievers."""
    bm25_backend: Bm25Backend = Bm25Backend.auto
    """bm25s's retrieval backend: numba (compiled, threaded: over 100x numpy's queries/s, after ~5 s
    of compiling), numpy, or auto (numba when installed and there are 2,000 queries or more). The
    rankings are the same either way."""
    batch_size: Union[int, str] = 128
    """Texts per forward pass when embedding. auto: the largest batch of max-length texts whose
    forward fits (probed first, the smallest over ranks); a batch that runs out of memory anyway
    is embedded in two halves."""
    embeddings_cache: Optional[str] = None
    """A folder where the candidate documents' embeddings are kept and reused by later runs with the
    same model, texts and settings; null = kept in the output's parts folder until the run ends."""
    pool_dtype: PoolDtype = PoolDtype.auto
    """How each rank holds its shard of the pool's embeddings: fp32, or fp16 (half the memory; cosines
    and rankings then carry fp16's rounding, about 1e-3); auto = fp16 on a GPU, fp32 on a CPU."""
    search: DenseSearch = DenseSearch.exact
    """Dense retrieval: exact (every candidate scored, sharded and chunked) or faiss (an approximate
    index per rank's shard, faiss_index; needs faiss-cpu). The filter's scores are exact either way;
    with faiss the summary reports recall against exact search on a sample of queries."""
    faiss_index: str = "HNSW32"
    """The FAISS index of each shard, as a faiss.index_factory string: HNSW32, IVF4096,Flat, IVF4096,PQ32, ..."""
    faiss_nprobe: int = 32
    """IVF indexes: clusters searched per query (more = slower, higher recall)."""
    faiss_ef_search: int = 256
    """HNSW indexes: the search's candidate list length (more = slower, higher recall)."""
    faiss_recall_sample: int = 256
    """Queries per block also searched exactly, to measure the approximate search's recall (0 = none)."""
    block_rows: int = 16384
    """Input rows mined at a time: each block's rows go to a part file (`<output>.parts/`) when done,
    so a crashed run, run again, resumes at the first missing block. Memory holds one block's
    candidates, whatever the input's size."""
    query_column: str = "query"
    """Column holding the query text."""
    positive_column: str = "positive"
    """Column holding the positive document text."""
    precision: Precision = Precision.fp32
    """fp32, or autocast in bf16 / fp16 when embedding."""
    device: str = "auto"
    """auto, cpu or cuda (each rank its own GPU under torchrun)."""


def register() -> None:
    """Make the schemas known to Hydra: `evaluate_schema` (conf/tools/evaluate.yaml), `mine_schema`
    (conf/tools/mine.yaml), `score_schema` (conf/tools/score.yaml) and `calibrate_schema`
    (conf/tools/calibrate.yaml)."""
    store = ConfigStore.instance()
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="mine_schema", node=MineConfig)
    store.store(name="score_schema", node=ScoreConfig)
    store.store(name="calibrate_schema", node=CalibrateConfig)
