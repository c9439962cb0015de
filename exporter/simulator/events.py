"""The user data stream events the simulator pushes when an account's data changes.

Pure functions from (old, new) data to Binance's event objects, field names as in
Binance's docs and SDK (shared/binance-pm-api.md). One change can push several
events, as on Binance: a cross-margin change pushes `outboundAccountPosition` and a
`balanceUpdate`, a borrow pushes `liabilityChange`, a UM or CM wallet change an
`ACCOUNT_UPDATE`, and a risk status other than NORMAL a `riskLevelChange`.
A negative balance is a wallet below zero, as Binance shows it: an asset whose
`negativeBalance` moves pushes an `ACCOUNT_UPDATE` whose `wb` and `cw` are minus that
amount (its wallet when it returns to zero). A trade (`trade_events`) pushes what a
fill does: an `ACCOUNT_UPDATE` (reason ORDER) and an `outboundAccountPosition`.
Data of shapes the API never sends (tests set them on purpose) still pushes an
`outboundAccountPosition`, with no assets. What Binance does not push, neither
does the simulator: unrealized PnL moving alone, and the return to NORMAL.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

MARGIN_FIELDS = ("crossMarginFree", "crossMarginLocked", "crossMarginAsset", "negativeBalance")
LIABILITY_FIELDS = ("crossMarginBorrowed", "crossMarginInterest")
#: a negative balance shows as the UM wallet below zero
UM_FIELDS = ("umWalletBalance", "negativeBalance")
CM_FIELDS = ("cmWalletBalance",)
#: fields whose change alone pushes nothing: as on Binance, no event carries
#: unrealized PnL moving with prices
QUIET_FIELDS = frozenset({"updateTime", "umUnrealizedPNL", "cmUnrealizedPNL"})
#: the default reason (`a.m`) of an ACCOUNT_UPDATE the simulator pushes
ACCOUNT_UPDATE_REASON = "ORDER"


def balance_events(old: Any, new: Any, now_ms: int, update_id: int) -> list[dict[str, Any]]:
    """The events for /papi/v1/balance records going from `old` to `new` (none if equal)."""
    if not (_is_records(old) and _is_records(new)):
        return [] if old == new else [_position(now_ms, update_id, [])]
    before, after = _by_asset(old), _by_asset(new)
    changed = [
        asset for asset in {**before, **after} if _news(before.get(asset, {}), after.get(asset, {}))
    ]
    if not changed:
        return []
    margin: list[str] = []
    liability: list[str] = []
    um: list[str] = []
    cm: list[str] = []
    for asset in changed:
        was, now = before.get(asset, {}), after.get(asset, {})
        moved = [_moved(was, now, fields) for fields in (LIABILITY_FIELDS, UM_FIELDS, CM_FIELDS)]
        if _moved(was, now, MARGIN_FIELDS) or not any(moved):
            margin.append(asset)
        for bucket, did in zip((liability, um, cm), moved, strict=True):
            if did:
                bucket.append(asset)
    events: list[dict[str, Any]] = []
    if margin:
        rows = [_position_row(asset, after.get(asset, {})) for asset in margin]
        events.append(_position(now_ms, update_id, rows))
        for asset in margin:
            delta = _delta(before.get(asset, {}), after.get(asset, {}), "crossMarginFree")
            if delta is not None and delta != 0:
                events.append(
                    {
                        "e": "balanceUpdate",
                        "E": now_ms,
                        "a": asset,
                        "d": _text(delta),
                        "U": update_id,
                        "T": now_ms,
                    }
                )
    for asset in liability:
        events.append(_liability(asset, after.get(asset, {}), now_ms))
    for fs, assets, wallet in (("UM", um, "umWalletBalance"), ("CM", cm, "cmWalletBalance")):
        if assets:
            rows = [
                _wallet_row(asset, before.get(asset, {}), after.get(asset, {}), wallet)
                for asset in assets
            ]
            events.append(
                {
                    "e": "ACCOUNT_UPDATE",
                    "fs": fs,
                    "E": now_ms,
                    "T": now_ms,
                    "i": "",
                    "a": {"m": ACCOUNT_UPDATE_REASON, "B": rows, "P": []},
                }
            )
    return events


def trade_events(
    asset: str,
    before: dict[str, Any],
    after: dict[str, Any],
    now_ms: int,
    update_id: int,
    *,
    fs: str = "UM",
) -> list[dict[str, Any]]:
    """The events of one fill on `asset` taking its record from `before` to `after`: the
    futures wallet (`fs` UM or CM) in an ACCOUNT_UPDATE for ORDER, then the margin free
    and locked balances in an outboundAccountPosition, a few milliseconds apart on Binance
    and with one E here."""
    wallet = "umWalletBalance" if fs == "UM" else "cmWalletBalance"
    return [
        {
            "e": "ACCOUNT_UPDATE",
            "fs": fs,
            "E": now_ms,
            "T": now_ms,
            "i": "",
            "a": {"m": "ORDER", "B": [_wallet_row(asset, before, after, wallet)], "P": []},
        },
        _position(now_ms, update_id, [_position_row(asset, after)]),
    ]


def risk_events(old: Any, new: Any, now_ms: int) -> list[dict[str, Any]]:
    """`riskLevelChange` when the account's risk changes and its status is not NORMAL.

    Binance has no event for the return to NORMAL, so neither does the simulator.
    """
    if not isinstance(new, dict) or not _news(old if isinstance(old, dict) else {}, new):
        return []
    status = new.get("accountStatus")
    if status in (None, "NORMAL"):
        return []
    return [
        {
            "e": "riskLevelChange",
            "E": now_ms,
            "u": new.get("uniMMR"),
            "s": status,
            "eq": new.get("accountEquity"),
            "ae": new.get("actualEquity"),
            "m": new.get("accountMaintMargin"),
        }
    ]


def listen_key_expired(now_ms: int) -> dict[str, Any]:
    """`listenKeyExpired` as Binance's docs and SDK model it: `E` a number, nothing else."""
    return {"e": "listenKeyExpired", "E": now_ms}


def listen_key_expired_as_seen(listen_key: str, now_ms: int) -> dict[str, Any]:
    """`listenKeyExpired` as seen in real payloads, off the SDK's model: `E` a string, and
    the key itself (the `expire_key` stream fault sends this form)."""
    return {"e": "listenKeyExpired", "E": str(now_ms), "listenKey": listen_key}


def unknown_event(now_ms: int, padding: int = 0) -> dict[str, Any]:
    """An event type no client knows, optionally padded to make a big frame."""
    event: dict[str, Any] = {"e": "SIMULATOR_UNKNOWN_EVENT", "E": now_ms}
    if padding:
        event["pad"] = "x" * padding
    return event


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(r, dict) and isinstance(r.get("asset"), str) for r in value
    )


def _by_asset(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {record["asset"]: record for record in records}


def _news(was: dict[str, Any], now: dict[str, Any]) -> bool:
    return any(was.get(k) != now.get(k) for k in was.keys() | now.keys() if k not in QUIET_FIELDS)


def _moved(was: dict[str, Any], now: dict[str, Any], fields: tuple[str, ...]) -> bool:
    return any(was.get(f) != now.get(f) for f in fields)


def _decimal(value: Any) -> Decimal | None:
    try:
        number = Decimal(str(value)) if value not in (None, "") else Decimal(0)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _delta(was: dict[str, Any], now: dict[str, Any], name: str) -> Decimal | None:
    before, after = _decimal(was.get(name)), _decimal(now.get(name))
    return None if before is None or after is None else after - before


def _text(value: Any) -> str:
    number = _decimal(value)
    return "0" if number is None else f"{number:f}"


def _position(now_ms: int, update_id: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"e": "outboundAccountPosition", "E": now_ms, "u": now_ms, "U": update_id, "B": rows}


def _position_row(asset: str, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "a": asset,
        "f": _text(record.get("crossMarginFree")),
        "l": _text(record.get("crossMarginLocked")),
    }


def _liability(asset: str, record: dict[str, Any], now_ms: int) -> dict[str, Any]:
    principal = _decimal(record.get("crossMarginBorrowed")) or Decimal(0)
    interest = _decimal(record.get("crossMarginInterest")) or Decimal(0)
    return {
        "e": "liabilityChange",
        "E": now_ms,
        "a": asset,
        "t": "BORROW",
        "T": now_ms,
        "p": _text(principal),
        "i": _text(interest),
        "l": _text(principal + interest),
    }


def _wallet_row(
    asset: str, was: dict[str, Any], now: dict[str, Any], wallet: str
) -> dict[str, Any]:
    change = _delta(was, now, wallet)
    debt = _decimal(now.get("negativeBalance"))
    balance = f"{-abs(debt):f}" if debt else _text(now.get(wallet))
    return {"a": asset, "wb": balance, "cw": balance, "bc": _text(change or 0)}
