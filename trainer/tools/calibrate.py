"""`python -m trainer.calibrate model=PATH data=BEIR_DIR [key=value ...]`: fit a map from the model's
cosine to P(relevant) on judged pairs, check it on pairs it was not fitted on, and save it.

The pairs: each judged query's relevant documents and as many non-relevant ones it ranks highest
(evaluate.judged_pairs). The check: another split's pairs (check_split), or out-of-fold
predictions over the queries (folds). It prints ECE and Brier score before (the cosine itself,
clipped to [0, 1]) and after, and writes calibration.json and the reliability diagram
calibration.png into the model's folder (or calibration_dir), whose model card then says how to
apply it. Under torchrun every rank embeds its share; rank 0 fits and writes (conf/tools/calibrate.yaml).
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.core import distributed
from trainer.data import DataError
from trainer.eval.beir import BeirSet, load_beir
from trainer.eval.calibration import (
    brier_score,
    cross_validated,
    expected_calibration_error,
    fit_calibration,
    uncalibrated,
)
from trainer.eval.evaluate import JudgedPairs, embed_eval_set, judged_pairs
from trainer.tools.common import describe_set, tool_embedders

PICTURE_FILE = "calibration.png"


def output_folder(cfg) -> Path:
    """Where the calibration goes, checked before any model is loaded."""
    if cfg.calibration_dir:
        folder = Path(cfg.calibration_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise ValueError(f"model={cfg.model}: not a model folder; calibration.json is written into the model's folder, "
                         "so give a saved one (e.g. a run's model/) or set calibration_dir")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model={cfg.model}: no model in this folder (config.json missing); give a saved model folder, "
                         "e.g. a run's model/")
    return folder


def _pairs(cfg, embedders, data: BeirSet, split: str) -> JudgedPairs:
    embed_queries, embed_docs, batch_size = embedders
    distributed.say(describe_set(cfg, data, split))
    pairs = judged_pairs(embed_eval_set(embed_queries, embed_docs, data, batch_size, progress=True), data)
    if pairs.labels.min() == pairs.labels.max():
        raise DataError(f"{cfg.data} ({split}): the judged pairs are all of one kind; calibration needs both")
    return pairs


def _short(path: str) -> str:
    """A path's last two parts (run/model, debian-sample/dev): enough to tell, short enough for a title."""
    return "/".join(Path(path).parts[-2:])


def _figures(before, after, labels, bins: int) -> dict[str, float]:
    return {
        "ece_before": expected_calibration_error(before, labels, bins), "ece_after": expected_calibration_error(after, labels, bins),
        "brier_before": brier_score(before, labels), "brier_after": brier_score(after, labels),
    }


def _run(cfg) -> None:
    from trainer.core import distributed
    from trainer.run.curves import draw_calibration
    from trainer.run.model_card import replace_calibration_section

    folder = output_folder(cfg)
    if cfg.check_split is None and cfg.folds < 2:
        raise ValueError(f"folds={cfg.folds}: cross-validation needs at least 2 folds (or set check_split)")
    # Read (and checked) before the model loads: bad data costs no model load.
    fit_set = load_beir(cfg.data, cfg.split)
    check_set = load_beir(cfg.data, cfg.check_split) if cfg.check_split else None
    for data, split in ((fit_set, cfg.split), (check_set, cfg.check_split)):
        if data is not None and not data.query_ids:
            raise DataError(f"{Path(cfg.data) / 'qrels' / f'{split}.tsv'}: no judged queries (no line names a query "
                            "of queries.jsonl): nothing to calibrate on")
    embedders = tool_embedders(cfg)
    fit_pairs = _pairs(cfg, embedders, fit_set, cfg.split)
    method = cfg.method.value
    calibration = fit_calibration(fit_pairs.scores, fit_pairs.labels, method)
    if check_set is not None:
        held = _pairs(cfg, embedders, check_set, cfg.check_split)
        held_probs = calibration.apply(held.scores)
        checked_on = f"split {cfg.check_split} ({len(held.labels)} pairs)"
    else:
        held = fit_pairs
        held_probs = cross_validated(fit_pairs.scores, fit_pairs.labels, fit_pairs.queries, method, cfg.folds)
        checked_on = f"{cfg.folds}-fold cross-validation over the queries"
    figures = _figures(uncalibrated(held.scores), held_probs, held.labels, cfg.bins)
    calibration.info = {
        "data": str(cfg.data), "split": cfg.split, "pairs": int(len(fit_pairs.labels)),
        "queries": int(len(set(fit_pairs.queries.tolist()))), "checked_on": checked_on, "bins": cfg.bins, **figures,
        "settings": {k: cfg[k] for k in ("query_prefix", "doc_prefix", "query_max_length", "doc_max_length")},
    }
    if not distributed.is_main():
        return
    path = calibration.save(folder)
    picture = draw_calibration(folder / PICTURE_FILE, held.scores, held.labels, held_probs, calibration, cfg.bins,
                               title=f"{_short(cfg.model)} on {_short(cfg.data)}: {method}, checked by {checked_on}")
    carded = replace_calibration_section(folder, calibration.to_dict())
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"ECE {figures['ece_before']:.4f} -> {figures['ece_after']:.4f}, Brier {figures['brier_before']:.4f} -> "
          f"{figures['brier_after']:.4f} ({method}; before = the cosine clipped to [0, 1]; checked on {checked_on})", flush=True)
    print(f"wrote {path} and {picture}" + ("; the model card says how to apply it" if carded else ""), flush=True)


def main() -> None:
    """`python -m trainer.calibrate model=PATH data=BEIR_DIR [key=value ...]` (conf/tools/calibrate.yaml)."""
    from trainer.tools.runner import run_tool

    run_tool("calibrate", _run)


if __name__ == "__main__":
    main()
