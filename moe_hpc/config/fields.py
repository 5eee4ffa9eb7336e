"""Typed config fields: each key's default and its rule in one place, checked when read.

Every number a config holds (the run config's tables, the cluster file, a Hugging Face
``config.json``) goes through ``typed`` (its type: an int refuses true, 8.5 and "eight") and
its ``Rule`` (its range). Integers are also capped at ``INT_MAX``: sizes and counts become
array shapes and MPI counts (C ints), where a larger one is an OverflowError deep in a rank,
not a message. A dataclass field declares both with ``checked(default, Rule(...))``;
tests/test_config.py checks that no number field lacks a rule.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

INT_MAX = 2 ** 31 - 1     # the largest count MPI takes (a C int); every int key is capped by it


@dataclass(frozen=True)
class Rule:
    """An allowed range: [low, high], with ``low`` itself refused when ``open_low``."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    note: str = ""            # why, or what a special value means, for the message

    def text(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.open_low else '['}{self.low}, {self.high}]"
        elif self.low is not None:
            text = f"{'>' if self.open_low else '>='} {self.low}"
        else:
            text = f"<= {self.high}"
        return f"{text} ({self.note})" if self.note else text

    def allows(self, value) -> bool:
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return low_ok and (self.high is None or value <= self.high)


AT_LEAST_1 = Rule(1)
AT_LEAST_0 = Rule(0)
POSITIVE = Rule(0, open_low=True)
FRACTION = Rule(0, 1, open_low=True)


def checked(default: Any, rule: Rule) -> dataclasses.Field:
    """A dataclass field with its default and its range rule."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def rule_of(f: dataclasses.Field) -> Rule | None:
    return f.metadata.get("rule")


def typed(name: str, value: Any, default: Any, where: str) -> Any:
    """``value`` checked against the type of ``default`` (ints are accepted for floats)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {name} must be a string, got {value!r}")
    return value


def in_range(name: str, value: Any, rule: Rule | None, where: str) -> Any:
    """``value`` when ``rule`` (and, for an int, the INT_MAX cap) allows it."""
    if isinstance(value, int) and not isinstance(value, bool) and value > INT_MAX:
        raise ConfigError(f"{where}: {name} must be at most {INT_MAX} (sizes and counts are C ints), "
                          f"got {value!r}")
    if rule is not None and not rule.allows(value):
        raise ConfigError(f"{where}: {name} must be {rule.text()}, got {value!r}")
    return value


def read_value(name: str, value: Any, default: Any, rule: Rule | None, where: str) -> Any:
    """Type, then range: what every config reader does with one value."""
    return in_range(name, typed(name, value, default, where), rule, where)


__all__ = ["INT_MAX", "Rule", "AT_LEAST_1", "AT_LEAST_0", "POSITIVE", "FRACTION", "checked", "rule_of",
           "typed", "in_range", "read_value"]
