"""Validation shared by the configuration modules: one-line errors that name the key and the fix."""

from __future__ import annotations

import enum
from typing import Any

from .errors import DfqError

TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_type(value: Any, kind: type, what: str) -> None:
    """TOML and Python callers can pass any type: say which key wants which, before it is used."""
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise DfqError(f"{what} must be {TYPE_NAMES[kind]}, not {value!r}")


def enum_value(kind: type[enum.Enum], value: Any, what: str) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise DfqError(f"unknown {what} '{value}': choose one of {choices}") from None


MAX_SEED = 2**31 - 1


def check_seed(value: Any, what: str) -> int:
    check_type(value, int, what)
    if not 0 <= value <= MAX_SEED:
        raise DfqError(f"{what} {value} is out of range: use 0 to {MAX_SEED}")
    return value
