"""Helpers of the config sections: fields with help text, and checks whose errors name the key."""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any

from finlora.errors import FinloraError


def opt(default: Any, help: str) -> Any:
    """A config field with a default and its help text."""
    return field(default=default, metadata={"help": help})


def opt_factory(factory: Callable[[], Any], help: str) -> Any:
    """A config field whose default is built by `factory` (a list, a section), with help."""
    return field(default_factory=factory, metadata={"help": help})


def fail(key: str, message: str) -> typing.NoReturn:
    # The message quotes the user's value: its line breaks are escaped to keep it one line.
    one_line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    raise FinloraError(f"config: {key} {one_line}")


def check_fraction(key: str, value: float, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        bound = "0 <= x < 1" if allow_zero else "0 < x < 1"
        fail(key, f"must be a fraction with {bound} (got {value})")


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        fail(key, f"must be one of {', '.join(allowed)} (got {value!r})")


def check_positive(key: str, value: int) -> None:
    if value <= 0:
        fail(key, f"must be a positive integer (got {value})")


def check_learning_rate(key: str, value: float | None) -> None:
    if value is not None and value <= 0:
        fail(key, f"must be positive or null (got {value})")
