"""Parsing of PM API responses into plain, immutable values.

Binance sends amounts as decimal strings. A string that is not a plain decimal
(or a number that is not finite once converted) makes its record malformed;
the empty string means "no value", so the series is absent rather than 0.
Unknown fields are ignored and missing fields are simply absent. Asset names and
the account status become label values: `exporter.labels` decides which can, and a
record whose name cannot is dropped. At most `MAX_ASSETS_PER_ANSWER` records of one
balance answer are read; the rest are dropped and counted.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from exporter import fields
from exporter.binance.errors import InvalidResponse
from exporter.labels import label_problem
from exporter.snapshot import AccountInfo, AssetBalance

#: records of one balance answer read at most (Binance lists a few hundred assets); the
#: rest are dropped: 100,000 assets made 300,000 series and scrapes of seconds
MAX_ASSETS_PER_ANSWER = 5000
#: problems kept per answer, for one log line of bounded size (all are counted)
MAX_PROBLEMS = 10

#: ASCII digits only: `\d` would also take Arabic-Indic and other Unicode digits
_DECIMAL = re.compile(r"-?[0-9]{1,40}(?:\.[0-9]{1,40})?")


class MalformedRecord(ValueError):
    """One record cannot be used; the rest of the response still can."""

    #: why, for the count of dropped records: "malformed" or "label"
    reason = "malformed"


class BadLabel(MalformedRecord):
    """A record whose asset name or status cannot be a label value (`exporter.labels`)."""

    reason = "label"


@dataclass(frozen=True, slots=True)
class ParsedBalances:
    balances: tuple[AssetBalance, ...]
    #: one line per skipped record (the first MAX_PROBLEMS), naming its index (and asset
    #: when it can be named)
    problems: tuple[str, ...] = ()
    #: assets named by skipped records, so their last good values can be kept
    skipped_assets: frozenset[str] = frozenset()
    #: records dropped, by reason: "malformed", "label", "duplicate", "over_cap"
    dropped: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


def parse_decimal(value: object) -> float | None:
    """A Binance decimal string as a float; None for "" (no value)."""
    if value == "":
        return None
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        raise MalformedRecord(f"not a decimal string: {_preview(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise MalformedRecord(f"out of range: {_preview(value)}")
    return number


def parse_millis(value: object) -> float | None:
    """An epoch-milliseconds integer as epoch seconds; None when absent or 0 (Binance's
    Portfolio Margin Pro docs show `updateTime: 0`: no time, never 1970)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**14:
        raise MalformedRecord(f"not an epoch-milliseconds integer: {_preview(value)}")
    return value / 1000 if value else None


def parse_amounts(
    record: Mapping[str, Any], table: tuple[fields.Field, ...]
) -> Mapping[str, float]:
    """The decimal fields of `table` that `record` holds, as numbers ("" gives none)."""
    values = {}
    for name in (f.api for f in table):
        if name in record:
            try:
                number = parse_decimal(record[name])
            except MalformedRecord as exc:
                raise MalformedRecord(f"{name}: {exc}") from None
            if number is not None:
                values[name] = number
    return MappingProxyType(values)


def parse_balance_record(record: object) -> AssetBalance:
    if not isinstance(record, dict):
        raise MalformedRecord(f"not an object: {_preview(record)}")
    asset = record.get("asset")
    if not isinstance(asset, str) or label_problem(asset) is not None:
        raise BadLabel(f"asset: {label_problem(asset)}")
    try:
        return AssetBalance(
            asset=asset,
            values=parse_amounts(record, fields.BALANCE),
            update_time=parse_millis(record.get("updateTime")),
        )
    except MalformedRecord as exc:
        raise MalformedRecord(f"{asset}: {exc}") from None


def parse_balances(payload: object) -> ParsedBalances:
    """Both shapes of GET /papi/v1/balance: an array, or one object (with `asset`)."""
    records = [payload] if isinstance(payload, dict) else payload
    if not isinstance(records, list):
        raise InvalidResponse(f"balance: expected an array or an object, got {_kind(payload)}")
    balances: list[AssetBalance] = []
    problems: list[str] = []
    skipped: set[str] = set()
    seen: set[str] = set()
    dropped: dict[str, int] = {}

    def drop(reason: str, problem: str, count: int = 1) -> None:
        dropped[reason] = dropped.get(reason, 0) + count
        if len(problems) < MAX_PROBLEMS:
            problems.append(problem)

    for index, record in enumerate(records[:MAX_ASSETS_PER_ANSWER]):
        try:
            balance = parse_balance_record(record)
        except MalformedRecord as exc:
            drop(exc.reason, f"record {index}: {exc}")
            name = record.get("asset") if isinstance(record, dict) else None
            if exc.reason != "label" and isinstance(name, str):
                skipped.add(name)
            continue
        if balance.asset in seen:
            drop("duplicate", f"record {index}: {balance.asset}: duplicate asset, first one kept")
            continue
        seen.add(balance.asset)
        balances.append(balance)
    if (over := len(records) - MAX_ASSETS_PER_ANSWER) > 0:
        drop("over_cap", f"{over} records past the first {MAX_ASSETS_PER_ANSWER} dropped", over)
    if records and not balances:
        raise InvalidResponse(f"balance: no usable record ({problems[0]})")
    return ParsedBalances(
        tuple(balances), tuple(problems), frozenset(skipped - seen), MappingProxyType(dropped)
    )


def parse_account(payload: object) -> AccountInfo:
    """GET /papi/v1/account. Any malformed known field makes the response unusable."""
    if not isinstance(payload, dict):
        raise InvalidResponse(f"account: expected an object, got {_kind(payload)}")
    status = payload.get("accountStatus")
    if status is not None and (problem := label_problem(status)) is not None:
        raise InvalidResponse(f"account: accountStatus: {problem}")
    try:
        return AccountInfo(
            values=parse_amounts(payload, fields.ACCOUNT),
            status=status,
            update_time=parse_millis(payload.get("updateTime")),
        )
    except MalformedRecord as exc:
        raise InvalidResponse(f"account: {exc}") from None


def parse_server_time(payload: object) -> float:
    """GET /fapi/v1/time or /api/v3/time: {"serverTime": ms} as epoch seconds."""
    if isinstance(payload, dict):
        try:
            seconds = parse_millis(payload.get("serverTime"))
        except MalformedRecord:
            seconds = None
        if seconds is not None:
            return seconds
    raise InvalidResponse(f"time: expected {{'serverTime': ms}}, got {_preview(payload)}")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _make_previewer() -> reprlib.Repr:
    # Bounded depth and width: a plain repr() of a deeply nested JSON value recurses
    # once per level and can raise RecursionError, which must not escape a parser.
    previewer = reprlib.Repr()
    previewer.maxlevel = 2
    previewer.maxdict = previewer.maxlist = 4
    previewer.maxstring = previewer.maxlong = previewer.maxother = 36
    return previewer


_PREVIEWER = _make_previewer()


def _preview(value: object) -> str:
    text = _PREVIEWER.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
