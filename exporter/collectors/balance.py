"""GET /papi/v1/balance: one gauge per asset and amount field (fields.BALANCE).

Its part is `AccountSnapshot.balances`. Unlike the other collectors, its answer is merged
into the last one: `parse` gives a `ParsedBalances`, whose skipped (malformed) records
keep their asset's last values (`merge`) and are counted (`skipped`); the asset filter
(`collect.assets`) applies (`narrow`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from exporter import fields
from exporter.binance.models import MAX_ASSETS_PER_ANSWER, ParsedBalances, parse_balances
from exporter.collectors.registry import (
    NOTHING_SKIPPED,
    Collector,
    Request,
    Scope,
    Skipped,
    register,
)
from exporter.collectors.stored import (
    Unusable,
    saved_label,
    saved_records,
    saved_time,
    saved_values,
)
from exporter.families import Family, Sample, help_text
from exporter.snapshot import AccountSnapshot, AssetBalance
from exporter.weights import WEIGHTS

PATH = "/papi/v1/balance"


def _field(field: str) -> Any:
    def samples(account: AccountSnapshot) -> Iterable[Sample]:
        for balance in account.balances:
            value = balance.values.get(field)
            if value is not None:
                yield (balance.asset,), value

    return samples


def _time(account: AccountSnapshot) -> Iterable[Sample]:
    for balance in account.balances:
        if balance.update_time is not None:
            yield (balance.asset,), balance.update_time


FAMILIES: tuple[Family, ...] = (
    *(
        Family(
            f.metric,
            help_text(f.help, f.api, fields.BALANCE_ENDPOINT),
            ("account", "asset"),
            _field(f.api),
        )
        for f in fields.BALANCE
    ),
    Family(
        "binance_pm_balance_update_timestamp_seconds",
        help_text(
            "When Binance last updated the asset's balance",
            "updateTime / 1000",
            fields.BALANCE_ENDPOINT,
        ),
        ("account", "asset"),
        _time,
    ),
)


def _get(account: AccountSnapshot) -> tuple[AssetBalance, ...]:
    return account.balances


def _put(account: AccountSnapshot, part: tuple[AssetBalance, ...] | None) -> AccountSnapshot:
    return replace(account, balances=part or ())


def _encode(part: tuple[AssetBalance, ...]) -> object:
    return [
        {"asset": b.asset, "values": dict(b.values), "update_time": b.update_time} for b in part
    ]


def _decode(saved: object) -> tuple[AssetBalance, ...]:
    records = saved_records(saved, MAX_ASSETS_PER_ANSWER, "assets")
    balances = tuple(
        AssetBalance(saved_label(r, "asset", "an asset"), saved_values(r), saved_time(r))
        for r in records
    )
    if len({b.asset for b in balances}) != len(balances):
        raise Unusable("duplicate", "duplicate assets")
    return tuple(sorted(balances, key=lambda b: b.asset))


def _times(part: tuple[AssetBalance, ...]) -> Iterable[float | None]:
    return (b.update_time for b in part)


def _merge(
    previous: tuple[AssetBalance, ...] | None, parsed: ParsedBalances
) -> tuple[AssetBalance, ...]:
    """The new balances; a skipped malformed record keeps its asset's last values."""
    kept = [b for b in previous or () if b.asset in parsed.skipped_assets]
    return tuple(sorted((*parsed.balances, *kept), key=lambda b: b.asset))


def _skipped(parsed: ParsedBalances) -> Skipped:
    if not parsed.dropped and not parsed.problems:
        return NOTHING_SKIPPED
    return Skipped(parsed.dropped, parsed.problems)


def _narrow(part: tuple[AssetBalance, ...], scope: Scope) -> tuple[AssetBalance, ...]:
    allowed = tuple(b for b in part if scope.allows_asset(b.asset))
    return part if len(allowed) == len(part) else allowed


COLLECTOR: Collector[Any] = register(
    Collector(
        name="balance",
        request=Request(PATH, WEIGHTS["balance"]),
        parse=parse_balances,
        families=FAMILIES,
        default=True,
        get=_get,
        put=_put,
        encode=_encode,
        decode=_decode,
        narrow=_narrow,
        merge=_merge,
        skipped=_skipped,
        times=_times,
        stored_as="balances",
    )
)
