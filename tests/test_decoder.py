"""Decoder embedders (a tiny random Qwen3): the end-of-text token, padding, instruction prompts,
and an export that sentence-transformers reproduces."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_train import assets, common, metrics  # noqa: F401 (assets is a fixture)
from tests.tiny import decoder_tokenizer, run_trainer, write_tiny_decoder
from trainer.core.embedders import text_embedder
from trainer.core.model import Encoder
from trainer.core.tokenizer import fill_task, load_tokenizer, prepare_for_last_token

EOS = 1  # decoder_tokenizer's <|endoftext|>


def test_last_token_pooling_appends_the_end_of_text_token_once_and_keeps_it_when_truncating():
    tokenizer = decoder_tokenizer()
    assert tokenizer("w1 w2")["input_ids"][-1] != EOS  # the family does not add it by itself
    prepare_for_last_token(tokenizer)
    assert tokenizer("w1 w2")["input_ids"][-1] == EOS
    assert tokenizer("w1 w2 w3 w4 w5", truncation=True, max_length=3)["input_ids"] == [2 + 1, 2 + 2, EOS]
    prepare_for_last_token(tokenizer)  # already there: not twice
    assert tokenizer("w1")["input_ids"] == [3, EOS]
    batch = tokenizer(["w1", "w1 w2 w3"], padding=True)
    assert batch["attention_mask"][0] == [1, 1, 0, 0]  # padded on the right
    off = decoder_tokenizer()
    prepare_for_last_token(off, append_eos=False)
    assert off("w1")["input_ids"] == [3]


def test_an_instruction_prompt_needs_its_task():
    assert fill_task("Instruct: {task}\nQuery: ", "find docs", "model.query_prefix") == "Instruct: find docs\nQuery: "
    assert fill_task("query: ", None, "model.query_prefix") == "query: "
    with pytest.raises(ValueError, match="set model.task"):
        fill_task("Instruct: {task}\nQuery: ", None, "model.query_prefix")


def test_decoder_run_exports_what_sentence_transformers_reproduces(assets, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = write_tiny_decoder(tmp_path / "qwen3")
    run_dir = tmp_path / "run"
    run_trainer(run_dir, *common(assets, "data.batch_size=16", "trainer.max_steps=2", "wandb.mode=disabled",
                                 f"model.name_or_path={model}", "model.pooling=last_token",
                                 "model.query_prefix='Instruct: {task}\nQuery: '", "model.task=find the passage"))
    assert [m["step"] for m in metrics(run_dir)] == [1, 2]
    exported = run_dir / "model"
    config = json.loads((exported / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": "Instruct: find the passage\nQuery: ", "document": ""}

    texts = ["w1 w2 w3", "w7 w8 w9 w10 w11 w12 w13"]
    st = SentenceTransformer(str(exported), device="cpu")
    assert st.tokenize(texts)["input_ids"][0][-1] == EOS  # the saved tokenizer appends it for them too
    theirs = torch.tensor(st.encode(texts, prompt_name="query"))
    encoder = Encoder.from_pretrained(str(exported)).eval()
    assert encoder.pooling == "last_token"
    embed = text_embedder(encoder, load_tokenizer(str(exported), pooling="last_token"),
                          "Instruct: find the passage\nQuery: ", 32, torch.device("cpu"))
    with torch.no_grad():
        ours = torch.nn.functional.normalize(embed(texts), dim=-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
