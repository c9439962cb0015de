"""Frames of the PM user data stream, parsed into small immutable values.

The stream says *when* and *where* to look; REST stays the source of truth. So a
parsed event keeps only what the exporter acts on: its type (as a bounded metric
label), its event time `E`, whether it moves the account's balances or risk, and
the risk fields of `riskLevelChange` (applied at once, then reconciled by REST).
Unknown event types are values too (kind "other"), never errors; a frame that is
not a JSON object with a string `e` raises `MalformedFrame`, whose message never
quotes the frame (a `listenKeyExpired` frame carries the listenKey); so does a
riskLevelChange whose status cannot be a label value (`exporter.labels`).
Field names: shared/binance-pm-api.md, "The PM user data stream".
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from exporter.binance.models import MalformedRecord, parse_decimal
from exporter.labels import label_problem

#: events that move an account's balances or risk: each one calls for a REST refresh
ACCOUNT_MOVING = frozenset(
    {
        "outboundAccountPosition",
        "balanceUpdate",
        "liabilityChange",
        "ACCOUNT_UPDATE",
        "riskLevelChange",
        "openOrderLoss",
    }
)
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
    #: the event type when the exporter knows it, else "other" (see EVENT_KINDS)
    kind: str
    #: `E`, the event time in epoch milliseconds (a number or a digit string), if usable
    time_ms: int | None
    #: the reason `a.m` of an ACCOUNT_UPDATE
    reason: str | None = None
    risk: RiskLevel | None = None

    @property
    def moves_account(self) -> bool:
        """The account's balances or risk changed: refresh it over REST."""
        return self.kind in ACCOUNT_MOVING

    @property
    def is_risk(self) -> bool:
        """A risk event, whose refresh goes before the others."""
        return self.kind == "riskLevelChange" or (
            self.kind == "ACCOUNT_UPDATE" and self.reason in RISK_REASONS
        )


def parse_frame(data: str | bytes) -> StreamEvent:
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise MalformedFrame("frame is not JSON") from None
    payload = _unwrapped(payload)
    if not isinstance(payload, dict):
        raise MalformedFrame(f"frame is a JSON {type(payload).__name__}, not an object")
    event_type = payload.get("e")
    if not isinstance(event_type, str):
        raise MalformedFrame('frame has no string "e" (event type)')
    known = event_type in ACCOUNT_MOVING or event_type in IGNORED
    kind = event_type if known or event_type == LISTEN_KEY_EXPIRED else OTHER
    event_time = _millis(payload.get("E"))
    if kind == "ACCOUNT_UPDATE":
        update = payload.get("a")
        reason = update.get("m") if isinstance(update, dict) else None
        return StreamEvent(kind, event_time, reason=reason if isinstance(reason, str) else None)
    if kind == "riskLevelChange":
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
