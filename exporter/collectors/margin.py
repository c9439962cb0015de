"""What the UM and CM margin collectors share: GET /papi/v1/{um,cm}/account parsed into
per-asset and per-position values, their families, and their state-file shape.

A helper, not a collector: it registers nothing. `futures_collector` builds one from a
book's path and field tables (um_account.py, cm_account.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from exporter import fields
from exporter.binance.errors import InvalidResponse
from exporter.binance.models import MalformedRecord, parse_amounts, parse_millis
from exporter.collectors.registry import Collector, Request, Scope, in_parts
from exporter.collectors.stored import (
    saved_label,
    saved_object,
    saved_records,
    saved_time,
    saved_values,
)
from exporter.families import Family, Sample, help_text
from exporter.labels import label_problem
from exporter.snapshot import AccountSnapshot

#: records of one answer read at most, assets and positions each (Binance lists a few
#: hundred symbols); the rest are dropped
MAX_RECORDS = 5000
#: the config switch that turns the position series off (`collect.positions: false`)
POSITIONS_SWITCH = "positions"

_EMPTY: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class MarginAsset:
    """One record of `assets[]`."""

    asset: str
    values: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    update_time: float | None = None


@dataclass(frozen=True, slots=True)
class Position:
    """One record of `positions[]` with a non-zero `positionAmt`."""

    symbol: str
    side: str
    values: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    update_time: float | None = None


@dataclass(frozen=True, slots=True)
class FuturesAccount:
    """GET /papi/v1/um/account or /papi/v1/cm/account, as the exporter keeps it."""

    assets: tuple[MarginAsset, ...] = ()
    positions: tuple[Position, ...] = ()


def _label(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or label_problem(value) is not None:
        raise MalformedRecord(f"{key}: {label_problem(value) or 'not a string'}")
    return value


def _records(payload: Mapping[str, Any], key: str, endpoint: str) -> list[Mapping[str, Any]]:
    records = payload.get(key, [])
    if not isinstance(records, list):
        raise InvalidResponse(f"{endpoint}: {key}: expected an array")
    for index, record in enumerate(records[:MAX_RECORDS]):
        if not isinstance(record, dict):
            raise InvalidResponse(f"{endpoint}: {key}[{index}]: not an object")
    return records[:MAX_RECORDS]


def parser(
    endpoint: str, assets: tuple[fields.Field, ...], positions: tuple[fields.Field, ...]
) -> Callable[[object], FuturesAccount]:
    """The parser of one book's answer: any malformed record makes it unusable (the last
    good part is kept); positions of amount 0 are left out; duplicates keep the first."""

    def parse(payload: object) -> FuturesAccount:
        if not isinstance(payload, dict):
            raise InvalidResponse(f"{endpoint}: expected an object")
        kept_assets: dict[str, MarginAsset] = {}
        kept_positions: dict[tuple[str, str], Position] = {}
        try:
            for index, record in enumerate(_records(payload, "assets", endpoint)):
                where = f"assets[{index}]"
                name = _label(record, "asset")
                where = f"assets[{index}] {name}"
                kept_assets.setdefault(
                    name,
                    MarginAsset(
                        name, parse_amounts(record, assets), parse_millis(record.get("updateTime"))
                    ),
                )
            for index, record in enumerate(_records(payload, "positions", endpoint)):
                where = f"positions[{index}]"
                symbol, side = _label(record, "symbol"), _label(record, "positionSide")
                where = f"positions[{index}] {symbol}"
                values = parse_amounts(record, positions)
                if not values.get("positionAmt"):
                    continue  # closed (or never opened): no series
                kept_positions.setdefault(
                    (symbol, side),
                    Position(symbol, side, values, parse_millis(record.get("updateTime"))),
                )
        except MalformedRecord as exc:
            raise InvalidResponse(f"{endpoint}: {where}: {exc}") from None
        return FuturesAccount(
            tuple(sorted(kept_assets.values(), key=lambda a: a.asset)),
            tuple(sorted(kept_positions.values(), key=lambda p: (p.symbol, p.side))),
        )

    return parse


def _narrow(part: FuturesAccount, scope: Scope) -> FuturesAccount:
    if scope.switches.get(POSITIONS_SWITCH, True) or not part.positions:
        return part
    return replace(part, positions=())


# --- the state file's shape -------------------------------------------------------------


def _encode(part: FuturesAccount) -> object:
    return {
        "assets": [
            {"asset": a.asset, "values": dict(a.values), "update_time": a.update_time}
            for a in part.assets
        ],
        "positions": [
            {
                "symbol": p.symbol,
                "side": p.side,
                "values": dict(p.values),
                "update_time": p.update_time,
            }
            for p in part.positions
        ],
    }


def decoder(
    assets: tuple[fields.Field, ...], positions: tuple[fields.Field, ...]
) -> Callable[[object], FuturesAccount]:
    asset_fields, position_fields = {f.api for f in assets}, {f.api for f in positions}

    def decode(saved: object) -> FuturesAccount:
        record = saved_object(saved)
        saved_assets = saved_records(record.get("assets"), MAX_RECORDS, "assets")
        saved_positions = saved_records(record.get("positions"), MAX_RECORDS, "positions")
        return FuturesAccount(
            tuple(
                MarginAsset(
                    saved_label(r, "asset", "an asset"),
                    saved_values(r, asset_fields),
                    saved_time(r),
                )
                for r in saved_assets
            ),
            tuple(
                Position(
                    saved_label(r, "symbol", "a symbol"),
                    saved_label(r, "side", "a position side"),
                    saved_values(r, position_fields),
                    saved_time(r),
                )
                for r in saved_positions
            ),
        )

    return decode


def _times(part: FuturesAccount) -> Iterable[float | None]:
    yield from (a.update_time for a in part.assets)
    yield from (p.update_time for p in part.positions)


# --- families ---------------------------------------------------------------------------


def _families(
    get: Callable[[AccountSnapshot], FuturesAccount | None],
    endpoint: str,
    assets: tuple[fields.Field, ...],
    positions: tuple[fields.Field, ...],
) -> tuple[Family, ...]:
    def asset_field(name: str) -> Callable[[AccountSnapshot], Iterable[Sample]]:
        def samples(account: AccountSnapshot) -> Iterable[Sample]:
            part = get(account)
            for asset in part.assets if part is not None else ():
                if (value := asset.values.get(name)) is not None:
                    yield (asset.asset,), value

        return samples

    def position_field(name: str) -> Callable[[AccountSnapshot], Iterable[Sample]]:
        def samples(account: AccountSnapshot) -> Iterable[Sample]:
            part = get(account)
            for position in part.positions if part is not None else ():
                if (value := position.values.get(name)) is not None:
                    yield (position.side, position.symbol), value

        return samples

    return (
        *(
            Family(
                f.metric,
                help_text(f.help, f"assets[].{f.api}", endpoint),
                ("account", "asset"),
                asset_field(f.api),
            )
            for f in assets
        ),
        *(
            Family(
                f.metric,
                help_text(f.help, f"positions[].{f.api}", endpoint),
                ("account", "position_side", "symbol"),
                position_field(f.api),
            )
            for f in positions
        ),
    )


def futures_collector(
    name: str,
    path: str,
    weight: int,
    assets: tuple[fields.Field, ...],
    positions: tuple[fields.Field, ...],
) -> Collector[FuturesAccount]:
    """A book's margin collector, off by default (`collect.<name>`), kept in
    `AccountSnapshot.parts[name]`."""
    endpoint = f"GET {path}"
    get, put = in_parts(name)
    return Collector(
        name=name,
        request=Request(path, weight),
        parse=parser(endpoint, assets, positions),
        families=_families(get, endpoint, assets, positions),
        default=False,
        get=get,
        put=put,
        encode=_encode,
        decode=decoder(assets, positions),
        narrow=_narrow,
        times=_times,
    )
