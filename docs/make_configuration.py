"""Writes docs/configuration.md from the schemas in trainer/run/config.py and trainer/tools/configs.py: every key of a training run
and of each tool, its default, and the docstring under its field (the schema is the one source;
tests/test_config.py fails when the page is stale).

    python docs/make_configuration.py
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO))

from trainer.run import config  # noqa: E402
from trainer.tools import configs  # noqa: E402

TOOLS = (("evaluate", configs.EvaluateConfig), ("calibrate", configs.CalibrateConfig), ("mine", configs.MineConfig),
         ("score", configs.ScoreConfig))


def field_docstrings(source: str) -> dict[str, dict[str, str]]:
    """{class name: {field: the string literal right under its annotated assignment}}."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        own = docs.setdefault(node.name, {})
        for statement, following in zip(node.body, node.body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                own[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _shown(value: object) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if value == "":
        return '`""`'
    if value == "(required)":
        return "required"
    if isinstance(value, list):
        value = [v.value if isinstance(v, enum.Enum) else v for v in value]
    return f"`{value}`"


def rows(cls, docs: dict[str, dict[str, str]], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every key of a schema, nested sections spelt out."""
    out = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        doc = next((docs.get(k.__name__, {}).get(f.name) for k in cls.__mro__ if f.name in docs.get(k.__name__, {})), "")
        if dataclasses.is_dataclass(default):
            out += rows(type(default), docs, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, _shown(default), doc.replace("|", "\\|")))
    return out


def _table(title: str, entries: list[tuple[str, str, str]]) -> list[str]:
    lines = [f"| {title} | default | meaning |", "|---|---|---|"]
    return lines + [f"| `{key}` | {default} | {meaning} |" for key, default, meaning in entries]


def page() -> str:
    docs = {}
    for schema_file in ("run/config.py", "tools/configs.py"):
        docs.update(field_docstrings((REPO / "trainer" / schema_file).read_text()))
    lines = ["# Configuration reference", "",
             "Generated from the schema's field docstrings (`trainer/run/config.py`, `trainer/tools/configs.py`) by `python docs/make_configuration.py`;",
             "`tests/test_config.py` fails when this page is stale. A misspelt key or a value of the wrong type fails",
             "when Hydra composes the config, before anything runs. The default groups change a few keys: the demo",
             "(`trainer=demo`) sets `trainer.max_steps` 24, `trainer.lr` 5e-5 and `trainer.warmup_steps` 2;",
             "`trainer=base` sets `grad_cache.chunk_tokens=auto`.", "", "## Training: `python -m trainer`", ""]
    entries = rows(config.Config, docs)
    for section in dict.fromkeys(key.split(".")[0] for key, _, _ in entries):
        lines += _table(f"`{section}.*`", [e for e in entries if e[0].split(".")[0] == section]) + [""]
    for tool, schema in TOOLS:
        lines += [f"## `python -m trainer.{tool}`", ""] + _table("key", rows(schema, docs)) + [""]
    return "\n".join(lines)


def main() -> None:
    (DOCS / "configuration.md").write_text(page())
    print(f"wrote {DOCS / 'configuration.md'}")


if __name__ == "__main__":
    main()
