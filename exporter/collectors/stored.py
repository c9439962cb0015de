"""Reading a collector's part back from the state file (`Collector.decode`): the checks
every part's records share. The file is ours, but a damaged or hand-edited one must not
put a bad label value or a non-number onto /metrics: each check raises `Unusable` (or
ValueError), and storage drops the account alone.

A helper, not a collector: it registers nothing. Standard library and labels only.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Any

from exporter.labels import label_problem


class Unusable(ValueError):
    """A saved part that cannot be used, and why, as `binance_pm_dropped_records_total`
    counts it: "malformed", "label", "duplicate", "over_cap", "out_of_range"."""

    def __init__(self, reason: str, problem: str) -> None:
        super().__init__(problem)
        self.reason = reason


def saved_object(saved: object) -> Mapping[str, Any]:
    """`saved` as a JSON object."""
    if not isinstance(saved, dict):
        raise Unusable("malformed", "not an object")
    return saved


def saved_records(saved: object, cap: int, what: str) -> list[Mapping[str, Any]]:
    """`saved` as an array of at most `cap` JSON objects (`what` names them)."""
    if not isinstance(saved, list):
        raise Unusable("malformed", f"{what}: not an array")
    if not all(isinstance(r, dict) for r in saved):
        raise Unusable("malformed", f"{what}: not objects")
    if len(saved) > cap:
        raise Unusable("over_cap", f"more than {cap} {what}")
    return saved


def saved_number(value: object) -> float:
    """A finite JSON number (never a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unusable("malformed", "not a finite number")
    return float(value)


def saved_values(
    saved: Mapping[str, Any], known: Collection[str] | None = None
) -> Mapping[str, float]:
    """The record's `values`: field name -> finite number; with `known`, only those."""
    amounts = saved.get("values")
    if not isinstance(amounts, dict):
        raise Unusable("malformed", "values: not an object")
    return MappingProxyType(
        {
            str(k): saved_number(v)
            for k, v in amounts.items()
            if known is None or k in known  # JSON keys are strings
        }
    )


def saved_time(saved: Mapping[str, Any], key: str = "update_time") -> float | None:
    """The record's time (epoch seconds) at `key`, or None."""
    value = saved.get(key)
    return None if value is None else saved_number(value)


def saved_label(saved: Mapping[str, Any], key: str, what: str | None = None) -> str:
    """The record's string at `key`, usable as a label value."""
    value = saved.get(key)
    if not isinstance(value, str):
        raise Unusable("malformed", f"{key}: not a string")
    if (problem := label_problem(value)) is not None:
        raise Unusable("label", f"{what or key} {problem}")
    return value


def saved_optional_label(saved: Mapping[str, Any], key: str, what: str | None = None) -> str | None:
    """The same as `saved_label`, or None when the record has none."""
    return None if saved.get(key) is None else saved_label(saved, key, what)
