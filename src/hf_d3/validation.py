"""Checks of the settings' values where they enter (`hf_d3.config`): each one's type, and the constraint stated
beside its field, so a bad value stops the run at once with its name, its value and what would be valid."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

# What HfArgumentParser reads as a bool from text (`string_to_bool`).
_BOOL_TEXT = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}


class Constraint:
    """What a setting's values must be, stated beside its field (`hf_d3.config`) and checked by `check_fields`."""

    def holds(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, name: str, value: Any) -> None:
        if not self.holds(value):
            raise ValueError(f"{name}={value!r} is not valid; valid: {self.describe()}")


@dataclass(frozen=True)
class AtLeast(Constraint):
    least: float

    def holds(self, value: Any) -> bool:
        return value >= self.least

    def describe(self) -> str:
        return f">= {self.least}"


@dataclass(frozen=True)
class AboveZero(Constraint):
    """A rate above zero, or a list whose every entry is."""

    def holds(self, value: Any) -> bool:
        return min(value if isinstance(value, list) else [value], default=1) > 0

    def describe(self) -> str:
        return "> 0 (every entry, for a list)"


@dataclass(frozen=True)
class Between(Constraint):
    low: float
    high: float

    def holds(self, value: Any) -> bool:
        return self.low <= value <= self.high

    def describe(self) -> str:
        return f"{self.low} to {self.high}"


@dataclass(frozen=True)
class OneOf(Constraint):
    choices: tuple

    def holds(self, value: Any) -> bool:
        return value in self.choices

    def describe(self) -> str:
        return f"one of {list(self.choices)}"


@dataclass(frozen=True)
class HubRepoId(Constraint):
    """A repo id the Hub would accept at the end of the run."""

    def holds(self, value: Any) -> bool:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(value)
        except HFValidationError:
            return False
        return True

    def describe(self) -> str:
        return "'user/name' of letters, digits, '-', '_' and '.'"


def setting(default: Any = MISSING, *, help: str | None = None, valid: Constraint | None = None,
            default_factory: Any = MISSING) -> Any:
    """A settings field with its help text and its constraint (`None` is always valid where the type allows it)."""
    metadata = {key: value for key, value in (("help", help), ("valid", valid)) if value is not None}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def check_fields(group: Any) -> None:
    """Refuse the first field of a frozen settings group whose value breaks the constraint stated beside it, after
    storing a whole number given for a float field as a float (YAML reads `expert_lr: 1` as an int): equal
    settings are then equal values, as the stage keys (`hf_d3.stages`) and `config.json` see them."""
    hints = typing.get_type_hints(type(group))
    for item in fields(group):
        value, constraint = getattr(group, item.name), item.metadata.get("valid")
        if _fits(value, hints[item.name], from_text=False) and value is not None and float in _floats(hints[item.name]):
            value = [float(v) for v in value] if isinstance(value, list) else float(value)
            object.__setattr__(group, item.name, value)
        if constraint is not None and value is not None:
            constraint.check(item.name, value)


def _floats(hint: Any) -> set:
    """The float types a field's annotation admits: float itself, or float inside a list."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return set().union(*(_floats(arg) for arg in typing.get_args(hint)))
    if typing.get_origin(hint) is list:
        return _floats(typing.get_args(hint)[0])
    return {hint} if hint is float else set()


def field_types(groups: Iterable[type]) -> dict[str, Any]:
    """Every flat setting name -> its annotated type, from the group dataclasses."""
    return {name: hint for group in groups for name, hint in typing.get_type_hints(group).items()}


def _fits(value: Any, hint: Any, from_text: bool) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, arg, from_text) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0], False) for v in value)
    if from_text and isinstance(value, str) and hint in (int, float, bool):  # the parser converts it, if it can
        if hint is bool:
            return value.lower() in _BOOL_TEXT
        try:
            hint(value)
        except ValueError:
            return False
        return True
    if isinstance(value, bool) or hint is bool:
        return isinstance(value, bool) and hint is bool
    return isinstance(value, int | float) if hint is float else isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("NoneType", "None")


def check_types(values: Mapping[str, Any], types_by_name: Mapping[str, Any], where: str = "",
                from_text: bool = False) -> None:
    """Refuse the first setting whose value is not of its field's type (names not in `types_by_name` are left to
    the unknown-key check). With `from_text` (a YAML file), a string the command-line parser converts is fine:
    YAML 1.1 reads `1e-6` as a string."""
    for name, value in values.items():
        hint = types_by_name.get(name)
        if hint is not None and not _fits(value, hint, from_text):
            raise ValueError(f"{name}={value!r} ({type(value).__name__}){where} is not valid; valid: a value of "
                             f"type {_type_name(hint)}")
