"""Classes by name, for the parts of hf_r8 a user extends without editing it: the LR rules
(`rule_registry.py`) and the sampler modes (`hf_r8/data/sampler_modes.py`).

A config names what it wants (`rules: [decision, my_rule]`, `sampler.mode: my_mode`); the registry turns a
name into the class that implements it. Built-in names cannot be taken over (a recorded run must mean the
same thing everywhere); a user name registered again is replaced, so a notebook cell can run twice.
Pure Python: it knows nothing of what it stores beyond the base class.
"""

from __future__ import annotations

from typing import Generic, TypeVar

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Names to subclasses of `base`: the built-ins first, then the user's in the order they were registered.

    Args:
        setting: the config field that names entries ("rules", "sampler.mode"), for error messages.
        base: the class every entry must subclass.
        built_in: the entries hf_r8 ships, in the order they are consulted.
        reserved: further names no entry may take (names that already mean something in the config).
        register_with: the public function that registers an entry, named in errors.
    """

    def __init__(self, setting: str, base: type[Entry], built_in: dict[str, type[Entry]], register_with: str,
                 reserved: tuple[str, ...] = ()) -> None:
        self.setting = setting
        self.base = base
        self.register_with = register_with
        self._classes = dict(built_in)
        self._reserved = (*built_in, *reserved)

    def register(self, name: str, entry: type[Entry]) -> None:
        """Make `entry` available under `name`; refuses a built-in or reserved name and a class of the wrong kind."""
        if not isinstance(name, str):
            raise TypeError(f"{self.register_with}(name={name!r}): must be a string")
        if not name:
            raise ValueError(f"{self.register_with}(name=''): must be a non-empty string")
        if not (isinstance(entry, type) and issubclass(entry, self.base)):
            raise TypeError(f"{self.register_with}({name!r}, {entry!r}): must be a subclass of "
                            f"{self.base.__module__}.{self.base.__qualname__}")
        if name in self._reserved:
            raise ValueError(f"{self.register_with}({name!r}, ...): {name!r} is built into hf_r8; choose another name")
        self._classes[name] = entry

    def names(self) -> tuple[str, ...]:
        """Every registered name, in the order entries are consulted."""
        return tuple(self._classes)

    def get(self, name: str) -> type[Entry]:
        """The class registered as `name`; an unknown name raises a ValueError that lists the registered ones."""
        if name not in self._classes:
            raise ValueError(f"{self.setting}: {name!r} is not registered: must be one of {list(self._classes)} "
                             f"(add one with {self.register_with})")
        return self._classes[name]
