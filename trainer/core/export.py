"""The export: a folder that loads with sentence-transformers (transformer, pooling, normalisation)
and with transformers' Auto classes; LoRA adapters saved beside the merged weights."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from trainer.core.lora import merged_state_dict
from trainer.core.model import Encoder


def save_sentence_transformer(
    encoder: Encoder,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    max_seq_length: int,
    backbone_state: dict[str, Tensor] | None = None,
) -> None:
    """Write a folder that loads with sentence_transformers.SentenceTransformer(folder) (transformer,
    pooling, normalisation) and with transformers.AutoModel / AutoTokenizer.

    backbone_state: the backbone's weights when the module does not hold them itself (ZeRO-3
    partitions them; see trainer/run/deepspeed_backend.py).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if backbone_state is None:
        backbone_state = encoder.backbone.state_dict()
    with _saving_unwrapped():
        if encoder.has_lora:
            # The adapter beside the model, and the model with the adapter merged into its weights:
            # what sentence-transformers (and anyone) loads without peft.
            # Merged from a CPU copy of the weights (or ZeRO-3's gathered ones): the module trained
            # on stays unmerged, and no second model is ever allocated on the accelerator.
            backbone_state = {name: value.detach().cpu() for name, value in backbone_state.items()}
            encoder.backbone.save_pretrained(folder / "adapter", state_dict=backbone_state)
            merged = merged_state_dict(encoder.backbone, backbone_state)
            encoder.backbone.get_base_model().save_pretrained(folder, state_dict={**merged, **encoder.untrained_weights})
        else:
            encoder.backbone.save_pretrained(folder, state_dict={**backbone_state, **encoder.untrained_weights})
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        # Training scores by cosine, so the saved model normalises: dot product = cosine for users.
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": encoder.dim,
        "pooling_mode_cls_token": encoder.pooling == "cls",
        "pooling_mode_mean_tokens": encoder.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_lasttoken": encoder.pooling == "last_token",
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"similarity_fn_name": "cosine", "model_type": "SentenceTransformer"}, indent=2)
    )


@contextlib.contextmanager
def _saving_unwrapped() -> Iterator[None]:
    """transformers' save_pretrained looks for a wrapper around the module through accelerate,
    which imports DeepSpeed (when installed) only to compare against its engine class: seconds of
    import and an accelerator warning in runs that never use DeepSpeed. What is saved here is a
    bare transformers module, never a wrapper."""
    from transformers import modeling_utils

    original = modeling_utils.unwrap_model
    modeling_utils.unwrap_model = lambda model, recursive=False: model
    try:
        yield
    finally:
        modeling_utils.unwrap_model = original

