"""The configuration reference (docs/configuration.md), generated from the `R8Config` dataclasses.

Each field's documentation is the string literal that follows it in the class body (the attribute
docstring convention the config uses); `ast` reads it from the source, so the reference cannot drift
from the code: `hf-r8 config-reference` writes it, and a test compares it with the committed file.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any

from hf_r8.control.config import R8Config, available_presets

HEADER = """# Configuration reference

Generated from the `R8Config` dataclasses by `hf-r8 config-reference > docs/configuration.md` (a test
keeps it in sync). Every field can be set in code (`R8Config(decision=DecisionConfig(patience_windows=3))`,
or `config.decision.patience_windows = 3` on a loaded preset), in YAML (nested sections, optionally
`base: PRESET_NAME` to start from a preset), or with `R8Config.from_dict`. Values out of range fail at
construction with the field's name and its allowed range.

Presets (`hf_r8/configs/*.yaml`, `hf-r8 presets`): {presets}.
"""


def field_docs(cls: type) -> dict[str, str]:
    """{field name: the string literal following its annotated assignment} for a dataclass."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs: dict[str, str] = {}
    for statement, following in zip(body, body[1:], strict=False):
        is_field = isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
        if is_field and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                and isinstance(following.value.value, str):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


_SECTION_NAMES = {field.name for field in dataclasses.fields(R8Config) if dataclasses.is_dataclass(_default(field))}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(cls: type, prefix: str) -> list[str]:
    docs = field_docs(cls)
    lines = ["| field | type | default | what it does |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if cls is R8Config and field.name in _SECTION_NAMES:
            continue  # a section: a table of its own
        type_name = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        lines.append(f"| `{prefix}{field.name}` | `{_cell(type_name)}` | `{_cell(repr(_default(field)))}` | "
                     f"{_cell(docs.get(field.name, ''))} |")
    return lines


def config_reference() -> str:
    """The whole reference as Markdown: top-level fields, then one table per section."""
    presets = ", ".join(f"`{name}`" for name in available_presets())
    lines = [HEADER.format(presets=presets), "## Top level", "", *_table(R8Config, "")]
    for field in dataclasses.fields(R8Config):
        if field.name not in _SECTION_NAMES:
            continue
        section = type(_default(field))
        summary = " ".join((inspect.getdoc(section) or "").split("\n\n")[0].split())
        lines += ["", f"## `{field.name}`", "", summary, "", *_table(section, f"{field.name}.")]
    return "\n".join(lines) + "\n"
