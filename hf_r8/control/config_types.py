"""The checking machinery every `R8Config` dataclass shares: one error shape, type conversion, range checks.

A config dataclass (`ValidatedConfig`) converts each field to the plain Python type its annotation names,
then runs its own range and cross-field checks; it does both at construction and again whenever
`validate()` is called, which is how a value assigned after construction gets checked. Every problem is
reported in one shape, ``section.field=value: must be ...``: ``TypeError`` for a value of the wrong type
(``"false"`` for a bool, a bare string for a list), ``ValueError`` for a value out of range.

What YAML and numpy hand over for a type (``"1e-5"``, ``np.int64(3)``, ``np.bool_``) is accepted and
stored as the plain Python value, so ``to_dict()`` stays YAML/JSON safe.

This module knows no section and no field by name (those live in the `config_*` section modules), and
nothing of torch or transformers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn

import numpy as np


def problem(section: str, name: str, value: Any, allowed: str) -> str:
    """The one error shape, `section.field=value: must be ...` (top-level fields have no section)."""
    return f"{section + '.' if section else ''}{name}={value!r}: must be {allowed}"


def reject(section: str, name: str, value: Any, allowed: str) -> NoReturn:
    """Raise the ``ValueError`` for a value out of its allowed range."""
    raise ValueError(problem(section, name, value, allowed))


def _as_bool(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError  # "false", 0, None: YAML and Python both have real booleans
    return bool(value)


def _as_int(value: Any) -> int:
    """Python or numpy integers, or a string `int()` reads exactly ("3", not "3.5"); never a bool."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise TypeError
    return int(value)


def _as_float(value: Any) -> float:
    """Any real number (numpy's too), or a string `float()` reads ("1e-5": PyYAML's reading); never a bool.

    Plain ints stay ints (the user's `0` reads back as `0`); the range checks reject non-finite values.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError
    return value if type(value) in (int, float) else float(value)


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    """A converter for lists (or tuples) of `item`: a bare string is not a list of one."""
    def convert(value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [item(element) for element in value]
    return convert


def _as_weights(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise TypeError
    return {key: _as_float(weight) for key, weight in value.items()}


# Field annotation (without " | None") -> (converter, what the error says is expected). Fields of other
# types (names checked against a list of choices, sections) are checked by their owner.
_CONVERTERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "bool": (_as_bool, "a boolean"),
    "int": (_as_int, "an integer"),
    "float": (_as_float, "a number"),
    "list[str]": (_list_of(_as_str), "a list of strings"),
    "list[float]": (_list_of(_as_float), "a list of numbers"),
    "dict[str, float]": (_as_weights, "a mapping of names to numbers"),
}


def _convert_fields(config: Any, section: str) -> None:
    """Store every field of the dataclass `config` as the plain Python type its annotation names.

    Runs before the range checks, so those compare numbers only; a value that is not of its field's
    type raises ``TypeError`` ("must be a number"), not a misleading range. Converting a converted
    value changes nothing, so validating twice is harmless.
    """
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        optional = spec.type.endswith(" | None")
        converter = _CONVERTERS.get(spec.type.removesuffix(" | None"))
        if converter is None or (optional and value is None):
            continue
        convert, expected = converter
        try:
            setattr(config, spec.name, convert(value))
        except (TypeError, ValueError):
            expected += " or null" if optional else ""
            raise TypeError(problem(section, spec.name, value, expected)) from None


class ValidatedConfig:
    """Base of the config dataclasses: converts every field to its type, then runs the class's `_check`.

    Both happen at construction and on every `validate()` call: validation in ``__post_init__`` alone
    would let ``config.decision.patience_windows = "3"`` (or ``config.rules.append("warp")``) through,
    so whoever consumes a config calls `validate()` first. `SECTION` is the name used in error messages
    ("" for the top level).
    """

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Convert every field to its type and run every check; raise ``TypeError``/``ValueError`` naming the field.

        Checks the fields as they are now, so values assigned after construction are checked too (and a
        numeric string assigned is stored as the number), in the same shape as at construction.
        """
        _convert_fields(self, self.SECTION)
        self._check()

    def _check(self) -> None:
        """Range and cross-field checks of the class (its fields already have their types)."""

    def _greater(self, name: str, bound: float, *, inclusive: bool = False) -> None:
        value = getattr(self, name)
        if not (math.isfinite(value) and (value >= bound if inclusive else value > bound)):
            reject(self.SECTION, name, value, f"{'>=' if inclusive else '>'} {bound}")

    def _between(self, name: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> None:
        value = getattr(self, name)
        ok = math.isfinite(value)
        ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
        if not ok:
            interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            reject(self.SECTION, name, value, f"in {interval}")

    def _positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if value < 1:
            reject(self.SECTION, name, value, "an integer >= 1")

    def _non_negative_int(self, name: str) -> None:
        value = getattr(self, name)
        if value < 0:
            reject(self.SECTION, name, value, "an integer >= 0")
