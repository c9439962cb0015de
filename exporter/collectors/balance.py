"""GET /papi/v1/balance: one gauge per asset and amount field (fields.BALANCE).

Its part is `AccountSnapshot.balances`. Unlike the other collectors, its answer is merged
into the last one (a malformed record keeps its asset's last values, the asset filter
applies): `parse` gives a `ParsedBalances`, which the poller merges.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from exporter import fields
from exporter.binance.models import ParsedBalances, parse_balances
from exporter.collectors.registry import Collector, Request, register
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
    # storage.py validates this shape (and its labels, times, cap) before it gets here
    records: list[Mapping[str, Any]] = saved  # type: ignore[assignment]
    return tuple(
        AssetBalance(r["asset"], MappingProxyType(dict(r["values"])), r.get("update_time"))
        for r in sorted(records, key=lambda r: str(r["asset"]))
    )


def _parse(payload: object) -> ParsedBalances:
    return parse_balances(payload)


COLLECTOR: Collector[Any] = register(
    Collector(
        name="balance",
        request=Request(PATH, WEIGHTS["balance"]),
        parse=_parse,
        families=FAMILIES,
        default=True,
        get=_get,
        put=_put,
        encode=_encode,
        decode=_decode,
        stored_as="balances",
    )
)
