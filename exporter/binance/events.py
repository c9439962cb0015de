"""Frames of the PM user data stream, parsed into small immutable values.

The stream says *when* and *where* to look; REST stays the source of truth. So a
parsed event keeps only what the exporter acts on: its type (as a bounded metric
label), its event time `E`, the assets it names and whether it shows a wallet below
zero (what `exporter.triggers.classify` reads to tell danger from routine), and the
risk fields of `riskLevelChange` (applied at once, then reconciled by REST).
Event types are matched as Binance's official SDK matches them, ignoring case and
underscores (`RISK_LEVEL_CHANGE` is `riskLevelChange`), and are reported under the
docs' spelling; a combined-stream frame (`{"stream", "data"}`) is read as its event.
Unknown event types are values too (kind "other"), never errors; a frame that is not
a JSON object with a string `e` raises `MalformedFrame`, whose message never quotes
the frame (a `listenKeyExpired` frame carries the listenKey); so does a
riskLevelChange whose status cannot be a label value (`exporter.labels`).
Field names: shared/binance-pm-api.md, "The PM user data stream".
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from exporter.binance.models import MalformedRecord, parse_decimal
from exporter.labels import label_problem

POSITION = "outboundAccountPosition"
BALANCE_UPDATE = "balanceUpdate"
LIABILITY_CHANGE = "liabilityChange"
ACCOUNT_UPDATE = "ACCOUNT_UPDATE"
RISK_LEVEL_CHANGE = "riskLevelChange"
OPEN_ORDER_LOSS = "openOrderLoss"
#: events that move an account's balances or risk: each one may call for a REST refresh
ACCOUNT_MOVING = frozenset(
    {POSITION, BALANCE_UPDATE, LIABILITY_CHANGE, ACCOUNT_UPDATE, RISK_LEVEL_CHANGE, OPEN_ORDER_LOSS}
)
#: of those, the ones about balances (the rest are about risk figures alone)
BALANCE_MOVING = frozenset({POSITION, BALANCE_UPDATE, LIABILITY_CHANGE, ACCOUNT_UPDATE})
LISTEN_KEY_EXPIRED = "listenKeyExpired"
#: documented events the exporter has no use for
IGNORED = frozenset(
    {
        "ORDER_TRADE_UPDATE",
        "executionReport",
        "ACCOUNT_CONFIG_UPDATE",
        "CONDITIONAL_ORDER_TRADE_UPDATE",
    }
)
OTHER = "other"
#: every value `StreamEvent.kind` takes: the `event` label stays bounded
EVENT_KINDS = (*sorted(ACCOUNT_MOVING), LISTEN_KEY_EXPIRED, *sorted(IGNORED), OTHER)
#: ACCOUNT_UPDATE reasons (`a.m`) that are risk events: Binance acted on the account
RISK_REASONS = frozenset({"INSURANCE_CLEAR", "AUTO_EXCHANGE"})


def canonical_name(name: str) -> str:
    """An event type as the official SDK compares them: no underscores, lower case."""
    return name.replace("_", "").lower()


#: canonical name -> the docs' spelling, for every type the exporter knows
_KNOWN = {canonical_name(k): k for k in (*ACCOUNT_MOVING, LISTEN_KEY_EXPIRED, *IGNORED)}


class MalformedFrame(ValueError):
    """A frame that is not an event: not JSON, not an object, or without a string `e`."""


@dataclass(frozen=True, slots=True)
class RiskLevel:
    """The fields of a `riskLevelChange`; None where absent or not a decimal string."""

    status: str | None
    uni_mmr: float | None
    equity: float | None  # USD
    actual_equity: float | None  # USD
    maint_margin: float | None  # USD


@dataclass(frozen=True, slots=True)
class StreamEvent:
    #: the event type when the exporter knows it (the docs' spelling), else "other"
    kind: str
    #: `E`, the event time in epoch milliseconds (a number or a digit string), if usable
    time_ms: int | None
    #: the reason `a.m` of an ACCOUNT_UPDATE
    reason: str | None = None
    risk: RiskLevel | None = None
    #: the assets the event names (`B[].a`, `a`, `O[].a`)
    assets: tuple[str, ...] = ()
    #: the assets whose wallet the event shows below zero: `wb` or `cw` of ACCOUNT_UPDATE,
    #: `f` of outboundAccountPosition ("" for a row without an asset name)
    below_zero: tuple[str, ...] = ()
    #: `l`, the asset's total liability after a liabilityChange
    liability: float | None = None
    #: the futures book whose positions an ACCOUNT_UPDATE moved (`fs`, "UM" or "CM", with
    #: a non-empty `P`), else None
    positions_of: str | None = None

    @property
    def moves_account(self) -> bool:
        """The account's balances or risk changed: refresh it over REST."""
        return self.kind in ACCOUNT_MOVING

    @property
    def moves_balances(self) -> bool:
        """The event is about balances (GET /papi/v1/balance shows the change)."""
        return self.kind in BALANCE_MOVING

    @property
    def is_risk(self) -> bool:
        """Binance acted on the account's risk: a riskLevelChange, an insurance clear or
        an auto-exchange (the event alone; `exporter.triggers.classify` reads more)."""
        return self.kind == RISK_LEVEL_CHANGE or (
            self.kind == ACCOUNT_UPDATE and self.reason in RISK_REASONS
        )


def parse_frame(data: str | bytes) -> StreamEvent:
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise MalformedFrame("frame is not JSON") from None
    payload = _unwrapped(payload)
    if not isinstance(payload, dict):
        raise MalformedFrame(f"frame is a JSON {type(payload).__name__}, not an object")
    return parse_event(payload)


def parse_event(payload: dict[str, object]) -> StreamEvent:
    """One event object, as decoded from a frame."""
    event_type = payload.get("e")
    if not isinstance(event_type, str):
        raise MalformedFrame('frame has no string "e" (event type)')
    kind = _KNOWN.get(canonical_name(event_type), OTHER)
    event_time = _millis(payload.get("E"))
    if kind == ACCOUNT_UPDATE:
        update = payload.get("a")
        update = update if isinstance(update, dict) else {}
        reason = update.get("m")
        rows = _rows(update.get("B"))
        book = payload.get("fs")
        moved = book in ("UM", "CM") and bool(_rows(update.get("P")))
        return StreamEvent(
            kind,
            event_time,
            reason=reason if isinstance(reason, str) else None,
            assets=_assets(rows),
            below_zero=_below_zero(rows, ("wb", "cw")),
            positions_of=book if moved and isinstance(book, str) else None,
        )
    if kind == POSITION:
        rows = _rows(payload.get("B"))
        below = _below_zero(rows, ("f",))
        return StreamEvent(kind, event_time, assets=_assets(rows), below_zero=below)
    if kind in (BALANCE_UPDATE, LIABILITY_CHANGE):
        asset = payload.get("a")
        assets = (asset,) if isinstance(asset, str) else ()
        liability = _amount(payload.get("l")) if kind == LIABILITY_CHANGE else None
        return StreamEvent(kind, event_time, assets=assets, liability=liability)
    if kind == OPEN_ORDER_LOSS:
        return StreamEvent(kind, event_time, assets=_assets(_rows(payload.get("O"))))
    if kind == RISK_LEVEL_CHANGE:
        status = payload.get("s")
        if isinstance(status, str) and (problem := label_problem(status)) is not None:
            raise MalformedFrame(f"riskLevelChange status: {problem}")  # becomes a label
        risk = RiskLevel(
            status=status if isinstance(status, str) else None,
            uni_mmr=_amount(payload.get("u")),
            equity=_amount(payload.get("eq")),
            actual_equity=_amount(payload.get("ae")),
            maint_margin=_amount(payload.get("m")),
        )
        return StreamEvent(kind, event_time, risk=risk)
    return StreamEvent(kind, event_time)


def _unwrapped(payload: object) -> object:
    """The event of a combined-stream frame, `{"stream": <name>, "data": {...}}` (the
    official SDKs' `/pm/stream` + SUBSCRIBE form); any other payload as it is."""
    if isinstance(payload, dict) and "e" not in payload and isinstance(payload.get("stream"), str):
        return payload.get("data")
    return payload


def _rows(value: object) -> list[dict[str, object]]:
    return [row for row in value if isinstance(row, dict)] if isinstance(value, list) else []


def _assets(rows: list[dict[str, object]]) -> tuple[str, ...]:
    return tuple(asset for row in rows if isinstance(asset := row.get("a"), str))


def _below_zero(rows: list[dict[str, object]], fields: tuple[str, ...]) -> tuple[str, ...]:
    """The assets of `rows` with any of `fields` below zero."""
    return tuple(
        asset if isinstance(asset := row.get("a"), str) else ""
        for row in rows
        if any(_negative(row.get(field)) for field in fields)
    )


def _negative(value: object) -> bool:
    amount = _amount(value)
    return amount is not None and amount < 0


def _millis(value: object) -> int | None:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 15:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**15:
        return value
    return None


def _amount(value: object) -> float | None:
    try:
        return parse_decimal(value) if value is not None else None
    except MalformedRecord:
        return None
