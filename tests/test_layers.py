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


def contract_broken(report: str, name: str) -> bool:
    """Whether lint-imports' summary marks the contract whose name starts with `name` BROKEN (a
    summary line ends in KEPT or BROKEN, long names wrapping onto the next line)."""
    summary = report.split("Contracts\n---------")[-1]
    after = summary[summary.index(name):]
    kept, broken = after.find("KEPT"), after.find("BROKEN")
    return broken >= 0 and (kept < 0 or broken < kept)


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
                                                 "from __future__ import annotations\n\nfrom trainer.run import config  # noqa\n", 1))
    proc = lint(tmp_path)
    # The four lower layers' contracts break (and mining's, which reaches the run through them).
    for contract in ("the library (trainer.core)", "data imports nothing", "retrieval imports nothing", "evaluation imports"):
        assert contract_broken(proc.stdout, contract), contract
    for module in LAYERS:
        importer = "trainer." + module.removesuffix(".py").replace("/", ".")
        assert f"{importer} -> trainer.run.config" in proc.stdout, importer


def import_cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds a circle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_circle_type_checking_imports_included():
    import grimp

    graph = grimp.build_graph("trainer", exclude_type_checking_imports=False)
    assert import_cycles(graph) == []
    # The search finds a circle when there is one: the run's config importing the loop back.
    graph.add_import(importer="trainer.run.config", imported="trainer.run.loop")
    assert any({"trainer.run.config", "trainer.run.loop"} <= set(c) for c in import_cycles(graph))


def test_tool_contracts_break_on_a_wrong_way_import(tmp_path):
    """A tool importing another tool, and the run importing a tool, each break their contract."""
    shutil.copytree(REPO / "trainer", tmp_path / "trainer", ignore=shutil.ignore_patterns("__pycache__"))
    for module, target in (("tools/calibrate.py", "trainer.tools.evaluate"), ("run/loop.py", "trainer.tools.summary"),
                           ("mining/blocks.py", "trainer.run.files")):
        path = tmp_path / "trainer" / module
        path.write_text(path.read_text().replace("from __future__ import annotations\n",
                                                 f"from __future__ import annotations\n\nimport {target}  # noqa\n", 1))
    proc = lint(tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:]
    for contract in ("no tool imports another tool", "the run imports no tool", "nothing imports the tools",
                     "mining imports the library"):
        assert contract_broken(proc.stdout, contract), contract
