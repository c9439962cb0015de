"""The server clock's offset, read from the time endpoints Binance documents.

Signed PM requests carry a `timestamp` that Binance rejects more than 1 s ahead of its
clock or older than `recvWindow` (-1021). The PM API documents no time endpoint (only
`/papi/v1/ping`, which has no time); Binance documents `GET /fapi/v1/time` on the USD-M
futures host and `GET /api/v3/time` on the spot host, weight 1 each. They are tried in
that order, at start and after a -1021; the first that answers sets the client's offset.

Each request goes through the accounts' own client (so their route: proxy, source
address) but is counted on its host's budget, never the PM one: each host counts weight
in a pool of its own, so a 429 or 418 there pauses that host's budget only, and a host
whose budget is paused is skipped. Syncs asked for while one runs share its answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import structlog

from exporter.binance import errors
from exporter.binance.client import FAPI_TIME_PATH, BinanceClient, RequestReport
from exporter.budget import BudgetLimits, Sleep, WeightBudget
from exporter.egress import EgressLedger
from exporter.selfmetrics import Instruments
from exporter.weights import FAPI_IP_WEIGHT_LIMIT_PER_MINUTE, WEIGHTS

log = structlog.get_logger("exporter.clocksync")

#: the time sync's share of the futures pool: 120 weight/min, a sync every 0.5 s at most
FAPI_TIME_SHARE = 0.05


def fapi_budget_limits(high_water: float) -> BudgetLimits:
    """The time sync's budget on the USD-M futures pool; pause at `high_water` of its limit."""
    return BudgetLimits(FAPI_IP_WEIGHT_LIMIT_PER_MINUTE, FAPI_TIME_SHARE, high_water)


@dataclass(frozen=True)
class TimeSource:
    """One documented time endpoint: its URL (absolute, or relative to the client's base
    URL), its `endpoint` name (WEIGHTS, metrics) and the budget of its host's pool."""

    url: str
    endpoint: str
    budget: WeightBudget


class ClockSync:
    """Sets a client's `clock_offset` from the first time source that answers."""

    def __init__(
        self, sources: Sequence[TimeSource], instruments: Instruments, *, egress: str
    ) -> None:
        self._sources = [(source, EgressLedger(source.budget, instruments)) for source in sources]
        self._egress = egress
        self._running: asyncio.Future[float | None] | None = None

    @classmethod
    def same_host(
        cls, budget: WeightBudget, instruments: Instruments, *, sleep: Sleep | None = None
    ) -> ClockSync:
        """`GET /fapi/v1/time` on the client's own base URL, on a budget of its own named
        after `budget`'s: for a poller built without the app's wiring (a test or a bench
        against a simulator, which serves every host on one port)."""
        limits = fapi_budget_limits(budget.settings.high_water)
        own = WeightBudget(
            f"fapi:{budget.egress}", limits, clock=budget.now, sleep=sleep or asyncio.sleep
        )
        return cls(
            [TimeSource(FAPI_TIME_PATH, "fapi_time", own)], instruments, egress=budget.egress
        )

    @property
    def sources(self) -> list[TimeSource]:
        return [source for source, _ in self._sources]

    async def sync(self, client: BinanceClient) -> float | None:
        """Measure and set the client's offset; the offset, or None when no source
        answered (the offset then stays as it was)."""
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._sync(client))
        return await asyncio.shield(self._running)

    async def _sync(self, client: BinanceClient) -> float | None:
        failure = "every time source's budget is paused"
        for source, ledger in self._sources:
            budget = source.budget
            if budget.is_paused(budget.now()):
                continue
            await budget.acquire(WEIGHTS[source.endpoint])
            try:
                offset = await client.measure_offset(
                    source.url, source.endpoint, observer=partial(_observe, ledger, client)
                )
            except errors.BinanceError as exc:
                ledger.note_error(exc, client.clock_offset)
                failure = str(exc)
                log.info("time_source_failed", egress=self._egress, source=source.endpoint)
                continue
            client.clock_offset = offset
            log.info(
                "time_synced",
                egress=self._egress,
                source=source.endpoint,
                offset_ms=round(offset * 1000),
            )
            return offset
        log.warning("time_sync_failed", egress=self._egress, error=failure)
        return None


def _observe(ledger: EgressLedger, client: BinanceClient, report: RequestReport) -> None:
    """A time request, counted in its host's ledger (metrics, that pool's used weight)."""
    ledger.observe(report, client.clock_offset)
