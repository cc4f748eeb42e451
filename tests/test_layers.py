"""The package's layers, as pyproject.toml's import-linter contracts state them: a wrong-way import
fails here, before review."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.tiny import REPO

LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([LINT, "--config", str(REPO / "pyproject.toml")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_layers_contracts_hold():
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


LAYERS = ["core/losses.py", "data/batches.py", "retrieval/search.py", "eval/beir.py"]


def test_a_wrong_way_import_breaks_the_contracts(tmp_path):
    """The same check on a copy of the package in which a module of each enforced layer (the
    library, data, retrieval, evaluation) imports the run's config: every contract must break,
    naming its import (so the test above can fail too)."""
    shutil.copytree(REPO / "trainer", tmp_path / "trainer", ignore=shutil.ignore_patterns("__pycache__"))
    for module in LAYERS:
        path = tmp_path / "trainer" / module
        path.write_text(path.read_text().replace("from __future__ import annotations\n",
                                                 "from __future__ import annotations\n\nfrom trainer import config  # noqa\n", 1))
    proc = lint(tmp_path)
    assert proc.returncode != 0 and "4 broken" in proc.stdout, proc.stdout[-3000:]
    for module in LAYERS:
        importer = "trainer." + module.removesuffix(".py").replace("/", ".")
        assert f"{importer} -> trainer.config" in proc.stdout, importer
