"""The configuration reference (docs/configuration.md), generated from the `R8Config` dataclasses.

Each row is one field: its name, type annotation and default from `dataclasses.fields`, and its help
from the field's ``metadata["help"]`` (the text the config modules write next to the field), so the
reference cannot drift from the code: `hf-r8 config-reference` writes it, and a test compares it with
the committed file. A field without help is an error here, not an empty cell.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from hf_r8.control.config import SECTIONS, R8Config, available_presets

HEADER = """# Configuration reference

Generated from the help of the `R8Config` dataclasses' fields by `hf-r8 config-reference > docs/configuration.md`
(a test keeps it in sync). Every field can be set in code (`R8Config(decision=DecisionConfig(patience_windows=3))`,
or `config.decision.patience_windows = 3` on a loaded preset), in YAML (nested sections, optionally
`base: PRESET_NAME` to start from a preset), or with `R8Config.from_dict`. A value of the wrong type or out of
range fails with the field's name and what it must be: at construction, and again when hf_r8 takes the config
(`R8Callback`, `R8Trainer`, `AdaptiveScheduler`, `R8Loop`), so a value assigned afterwards is checked too;
`config.validate()` runs the same checks on demand.

Presets (`hf_r8/configs/*.yaml`, `hf-r8 presets`): {presets}.
"""


def _default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    return spec.default_factory()  # type: ignore[misc]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(cls: type, prefix: str) -> list[str]:
    lines = ["| field | type | default | what it does |", "|---|---|---|---|"]
    for spec in dataclasses.fields(cls):
        if cls is R8Config and spec.name in SECTIONS:
            continue  # a section: a table of its own
        lines.append(f"| `{prefix}{spec.name}` | `{_cell(spec.type)}` | `{_cell(repr(_default(spec)))}` | "
                     f"{_cell(spec.metadata['help'])} |")
    return lines


def config_reference() -> str:
    """The whole reference as Markdown: top-level fields, then one table per section."""
    presets = ", ".join(f"`{name}`" for name in available_presets())
    lines = [HEADER.format(presets=presets), "## Top level", "", *_table(R8Config, "")]
    for name, section in SECTIONS.items():
        summary = " ".join((inspect.getdoc(section) or "").split("\n\n")[0].split())
        lines += ["", f"## `{name}`", "", summary, "", *_table(section, f"{name}.")]
    return "\n".join(lines) + "\n"
