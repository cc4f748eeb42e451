"""A model's tokenizer, set up as training, evaluation and mining all use it: decoder embedders'
end-of-text token, instruction prompts with the task filled in, the length a model is meant for."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trainer.core.model import check_remote_code, resolve_model_path


def base_max_length(name_or_path: str, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The input length a model is meant to be used at: its sentence-transformers max_seq_length,
    else its tokenizer's model_max_length (when that states a real limit); None if neither says."""
    config_file = Path(resolve_model_path(name_or_path)) / "sentence_bert_config.json"
    if config_file.is_file():
        length = json.loads(config_file.read_text()).get("max_seq_length")
        if isinstance(length, int) and length > 0:
            return length
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, pooling: str | None = None, append_eos: bool | None = None
) -> PreTrainedTokenizerBase:
    """The model's tokenizer; for last_token pooling, set up as decoder embedders expect (see
    prepare_for_last_token)."""
    path = resolve_model_path(name_or_path)
    check_remote_code(path, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if pooling == "last_token":
        prepare_for_last_token(tokenizer, append_eos)
    return tokenizer


def ends_with_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.eos_token_id is not None and bool(ids) and ids[-1] == tokenizer.eos_token_id


def prepare_for_last_token(tokenizer: PreTrainedTokenizerBase, append_eos: bool | None = None) -> None:
    """Decoder embedders (Qwen3-Embedding, e5-mistral, gte-Qwen) embed the state of the end-of-text
    token appended to every text: its attention has seen the whole text. append_eos None = append
    it when the tokenizer has one and does not add it already. It is added by the tokenizer itself
    (its post-processor), so it survives truncation, enters the token cache's key, and is saved
    with the model: sentence-transformers then tokenises exactly as training did.

    Padding goes on the right: the pooling finds the last real token from the attention mask on
    either side, but only right padding keeps a text's positions independent of its batch for
    every position scheme (absolute ones included)."""
    tokenizer.padding_side = "right"
    if append_eos is False:
        return
    if tokenizer.eos_token_id is None:
        if append_eos is None:
            return
        raise ValueError("model.append_eos=true, but the tokenizer has no end-of-text token (eos_token)")
    if ends_with_eos(tokenizer):
        return
    if hasattr(tokenizer, "add_eos_token"):  # Llama-style tokenizers rebuild their post-processor from this flag
        tokenizer.add_eos_token = True
    elif getattr(tokenizer, "is_fast", False):
        from tokenizers import processors

        eos = tokenizer.eos_token
        append = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.eos_token_id)]
        )
        existing = tokenizer.backend_tokenizer.post_processor
        tokenizer.backend_tokenizer.post_processor = append if existing is None else processors.Sequence([existing, append])
    if not ends_with_eos(tokenizer):
        raise ValueError(f"could not make the {type(tokenizer).__name__} tokenizer append {tokenizer.eos_token!r}; "
                         "set model.append_eos=false, or append it in model.doc_prefix/query_prefix yourself")


def fill_task(prefix: str, task: str | None, key: str) -> str:
    """An instruction prompt with model.task filled in: 'Instruct: {task}\\nQuery: '."""
    if "{task}" not in prefix:
        return prefix
    if not task:
        raise ValueError(f"{key} asks for {{task}} ({prefix!r}): set model.task, e.g. "
                         "model.task='Given a web search query, retrieve relevant passages that answer the query'")
    return prefix.replace("{task}", task)


def prompt_prefixes(model_cfg) -> tuple[str, str]:
    """The query and document prefixes of a run's model.* settings, model.task filled in."""
    return (fill_task(model_cfg.query_prefix, model_cfg.task, "model.query_prefix"),
            fill_task(model_cfg.doc_prefix, model_cfg.task, "model.doc_prefix"))

