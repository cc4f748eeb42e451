"""The check's command line: the run's own overrides, composed exactly as `python -m trainer`
composes them, plus a few `check.*` keys of its own (never part of the run's config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from omegaconf import DictConfig


@dataclass
class CheckSettings:
    output: str = "check.json"
    """Where the report goes (besides the table on stdout)."""
    rows: int = 4
    """Rows per rank of the run's first global batch that the exactness step takes."""
    chunk_rows: int = 1
    """Texts per GradCache chunk in the exactness step: small, so that every side has several."""
    repeats: int = 5
    """Timed repetitions of each collective (the fabric)."""
    input_batches: int = 3
    """Batches the input path makes while it is timed."""


def split_overrides(argv: list[str]) -> tuple[CheckSettings, list[str]]:
    """(the check's settings, the run's overrides). `check.KEY=VALUE` sets a CheckSettings field;
    an unknown one is an error naming the known ones. Hydra's own keys (hydra.*) concern where a
    run writes, which the check never does: they are dropped."""
    settings, overrides = CheckSettings(), []
    fields = {f.name: f for f in dataclasses.fields(CheckSettings)}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.startswith("check."):
            name = key.removeprefix("check.")
            if name not in fields or not _:
                raise ValueError(f"{arg}: unknown check setting; the check takes "
                                 + ", ".join(f"check.{n}" for n in fields) + " (KEY=VALUE)")
            kind = type(getattr(settings, name))
            try:
                setattr(settings, name, kind(value))
            except ValueError:
                raise ValueError(f"{arg}: check.{name} must be {kind.__name__}") from None
            if kind is int and getattr(settings, name) < 1:
                raise ValueError(f"{arg}: check.{name} must be at least 1")
        elif not key.lstrip("+~").startswith("hydra."):
            overrides.append(arg)
    return settings, overrides


def compose_run_config(overrides: list[str]) -> DictConfig:
    """The run's config: conf/config.yaml with the overrides, through the training schema (a bad
    key or value fails here with Hydra's one-line message, as it would for the run)."""
    from hydra import compose, initialize_config_dir

    from trainer.run import config
    from trainer.run.app import CONF_DIR

    config.register()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="trainer"):
        return compose(config_name="config", overrides=overrides)
