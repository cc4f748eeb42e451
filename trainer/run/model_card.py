"""The model card (README.md) of an exported model: YAML metadata in the layout sentence-transformers
and the Hugging Face hub read (library_name, pipeline_tag, base_model, tags, datasets,
model-index), then how to use the model, how it was trained, how it scored and how to reproduce it.

The card states facts it is given (CardFacts): the run (card_facts.py) gathers them, so this module
needs neither torch nor the run. The calibration section is rewritten on its own by
`python -m trainer.calibrate` once the model has a calibration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

CARD_FILE = "README.md"
CALIBRATION_START, CALIBRATION_END = "<!-- calibration -->", "<!-- /calibration -->"


@dataclass
class CardFacts:
    base_model: str
    """model.name_or_path as given."""
    base_model_id: str | None
    """Its hub id, when known (metadata's base_model)."""
    dim: int
    pooling: str
    max_seq_length: int
    query_max_length: int
    doc_max_length: int
    prompts: dict[str, str]
    loss: str
    """One line: the loss, its directions and temperature."""
    global_batch: int
    world_size: int
    backend: str
    precision: str
    optimizer: str
    steps: int
    kept_step: int
    num_negatives: int
    sources: list[dict]
    """{name, paths, rows, share} per source."""
    command: str
    version: str
    extras: dict[str, str] = field(default_factory=dict)
    """Training rows that apply only to some runs: LoRA, Matryoshka, distillation, GradCache."""
    eval_data: str | None = None
    eval_size: str = ""
    """e.g. '400 queries, 1348 documents'."""
    before: dict[str, float] | None = None
    """The evaluation at step 0."""
    after: dict[str, float] | None = None
    """The evaluation of the exported model (its step: kept_step)."""
    datasets: list[str] = field(default_factory=list)
    """Training sources that are hub datasets."""


def metric_id(key: str) -> str:
    """An evaluation key as a model-index metric type: ndcg@10 -> cosine_ndcg@10, ndcg@10/dim64 ->
    cosine_ndcg@10_dim64 (sentence-transformers' names: scores are cosine similarities)."""
    return "cosine_" + key.replace("/", "_")


def metadata(facts: CardFacts) -> dict:
    meta: dict = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity"}
    if facts.base_model_id:
        meta["base_model"] = facts.base_model_id
    rows = sum(s["rows"] for s in facts.sources)
    meta["tags"] = ["sentence-transformers", "sentence-similarity", "feature-extraction", "contrastive-trainer",
                    f"dataset_size:{rows}", f"loss:{facts.loss.split(' ')[0]}"]
    if facts.datasets:
        meta["datasets"] = list(facts.datasets)
    if facts.after:
        name = Path(facts.eval_data).name if facts.eval_data else "eval"
        meta["model-index"] = [{
            "name": f"SentenceTransformer based on {facts.base_model_id or facts.base_model}",
            "results": [{
                "task": {"type": "information-retrieval", "name": "Information Retrieval"},
                "dataset": {"name": name, "type": name},
                "metrics": [{"type": metric_id(k), "value": float(v), "name": f"Cosine {k}"} for k, v in facts.after.items()],
            }],
        }]
    return meta


def _usage(facts: CardFacts) -> str:
    query_kw = ', prompt_name="query"' if facts.prompts.get("query") else ""
    doc_kw = ', prompt_name="document"' if facts.prompts.get("document") else ""
    lines = [
        "## Usage", "",
        "```python", "from sentence_transformers import SentenceTransformer", "",
        'model = SentenceTransformer("path/to/this/folder")',
        f'queries = model.encode(["how do I read a PDF on the console"]{query_kw})',
        f'documents = model.encode(["A terminal PDF viewer.", "A tool to resize images."]{doc_kw})',
        "scores = model.similarity(queries, documents)  # cosine: the vectors are unit length", "```", "",
        f"{facts.dim}-dimensional unit vectors ({facts.pooling} pooling); inputs are cut at {facts.max_seq_length} tokens "
        f"(training read queries up to {facts.query_max_length} tokens and documents up to {facts.doc_max_length}).",
    ]
    if facts.prompts.get("query") or facts.prompts.get("document"):
        lines += ["", "Training prepended these prompts; `prompt_name` adds them the same way: "
                  + ", ".join(f"{k} `{v!r}`" for k, v in facts.prompts.items() if v) + "."]
    return "\n".join(lines)


def _training(facts: CardFacts) -> str:
    per_rank = facts.global_batch // max(facts.world_size, 1)
    rows = [
        ("loss", facts.loss),
        ("global batch", f"{facts.global_batch} pairs ({facts.world_size} rank(s) x {per_rank}), in-batch negatives from every rank"),
        ("hard negatives", f"{facts.num_negatives} per query"),
        ("steps", f"{facts.steps}" + (f" (model kept: step {facts.kept_step}, early stopping)" if facts.kept_step != facts.steps else "")),
        ("optimizer", facts.optimizer),
        ("precision", facts.precision),
        ("backend", f"{facts.backend}, world size {facts.world_size}"),
        *facts.extras.items(),
    ]
    table = ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    sources = ["| source | files | rows | share of batches |", "|---|---|---:|---:|"]
    sources += [f"| {s['name']} | {', '.join(f'`{p}`' for p in s['paths'])} | {s['rows']} | {s['share']:.3f} |"
                for s in facts.sources]
    return "\n".join(["## Training", "", *table, "", "Training data:", "", *sources])


def _evaluation(facts: CardFacts) -> str:
    if not facts.after:
        return "## Evaluation\n\nNot evaluated during training (no eval.data)."
    head = (f"Exact cosine search over `{facts.eval_data}` ({facts.eval_size}); the base model at step 0, "
            f"the exported model at step {facts.kept_step}.")
    table = ["| metric | before (step 0) | after (step %d) |" % facts.kept_step, "|---|---:|---:|"]
    for key, value in facts.after.items():
        before = (facts.before or {}).get(key)
        table.append(f"| {key} | {before:.4f} | {value:.4f} |" if before is not None else f"| {key} | n/a | {value:.4f} |")
    return "\n".join(["## Evaluation", "", head, "", *table])


def calibration_section(calibration: dict | None) -> str:
    """The card's text on calibrated scores: how to get them, or how to apply the one fitted."""
    if calibration is None:
        body = ("Cosine similarities rank well but are not probabilities. To threshold them, fit a calibration on "
                "held-out judged data: `python -m trainer.calibrate model=path/to/this/folder data=BEIR_DIR` "
                "writes calibration.json here, and this section then says how well it fits.")
    else:
        body = (f"calibration.json maps a cosine to P(relevant) ({calibration['method']}, fitted on "
                f"`{calibration['data']}` split {calibration['split']}, {calibration['pairs']} judged pairs). "
                f"On held-out {calibration['checked_on']}: ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}, "
                f"Brier {calibration['brier_before']:.4f} -> {calibration['brier_after']:.4f} "
                "(before: the cosine itself, clipped to [0, 1]).\n\n"
                "```python\nfrom trainer.calibration import load_calibration\n\n"
                "probability = load_calibration(\"path/to/this/folder\").apply(scores)  # scores: cosines\n```")
    return f"{CALIBRATION_START}\n{body}\n{CALIBRATION_END}"


def render_card(facts: CardFacts, calibration: dict | None = None) -> str:
    title = f"# {facts.base_model_id or Path(facts.base_model).name}, fine-tuned for retrieval"
    intro = (f"A sentence-transformers bi-encoder trained with contrastive-trainer {facts.version} from "
             f"`{facts.base_model}`.")
    reproduce = f"## Reproduce\n\n```bash\n{facts.command}\n```\n\ncontrastive-trainer {facts.version}."
    sections = [title, intro, _usage(facts), _training(facts), _evaluation(facts),
                "## Calibrated scores\n\n" + calibration_section(calibration), reproduce]
    front = yaml.safe_dump(metadata(facts), sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n\n".join(sections) + "\n"


def write_model_card(folder: Path, facts: CardFacts, calibration: dict | None = None) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(render_card(facts, calibration))
    return path


def replace_calibration_section(folder: Path, calibration: dict) -> bool:
    """Rewrite an existing card's calibration section; False when the folder has no card of ours."""
    path = Path(folder) / CARD_FILE
    text = path.read_text() if path.exists() else ""
    start, end = text.find(CALIBRATION_START), text.find(CALIBRATION_END)
    if start < 0 or end < start:
        return False
    path.write_text(text[:start] + calibration_section(calibration) + text[end + len(CALIBRATION_END):])
    return True
