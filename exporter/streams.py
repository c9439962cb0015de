"""Every account's user data stream, wired to the poller of its route.

The stream tells the exporter when and where to look; REST stays the source of truth.
Each account gets one `UserDataStream` through its own route: the listenKey calls go
through its poller's client (counted like every request, endpoint `listen_key`) after
that route's budget lets them (1 weight each, pauses obeyed), and WebSocket connection
attempts of one route share one `ConnectPacer`. What a stream reports becomes:

- a balance- or risk-moving event: a triggered refresh of the account (RISK or EVENT);
- a riskLevelChange: its figures in the snapshot at once, then the refresh reconciles;
- a reconnect: a CATCHUP refresh (events sent while disconnected are lost); the first
  connection needs none, the round-robin's first pass is that refresh;
- its health: `binance_pm_stream_*` through `StreamHealth`;
- a 429/418 (or WAF 403) on a listenKey call: a pause of the route, like any request.

A stream that fails never stops REST polling of its account, nor touches another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import structlog

from exporter.binance import errors
from exporter.binance.events import StreamEvent
from exporter.binance.stream import ConnectPacer, StreamObserver, UserDataStream
from exporter.budget import WeightBudget
from exporter.poller import EgressPoller, Target
from exporter.route import Route
from exporter.selfmetrics import StreamHealth
from exporter.triggers import Priority

log = structlog.get_logger("exporter.streams")


class _AccountObserver(StreamObserver):
    """One account's stream reports, turned into its poller's triggers and health metrics."""

    def __init__(
        self, name: str, poller: EgressPoller, health: StreamHealth, clock: Callable[[], float]
    ) -> None:
        self._name = name
        self._poller = poller
        self._health = health
        self._clock = clock
        self._connected_before = False

    def stream_connected(self) -> None:
        self._health.stream_connected(self._name)
        if self._connected_before:
            self._poller.trigger(self._name, Priority.CATCHUP)
        self._connected_before = True

    def stream_disconnected(self, reason: str) -> None:
        if reason != "shutdown":
            self._health.stream_disconnected(self._name, reason)

    def stream_event(self, event: StreamEvent) -> None:
        event_time = None if event.time_ms is None else event.time_ms / 1000
        self._health.stream_event(self._name, event.kind, event_time)
        if event.risk is not None:
            self._poller.apply_risk(
                self._name,
                uni_mmr=event.risk.uni_mmr,
                equity=event.risk.equity,
                actual_equity=event.risk.actual_equity,
                maint_margin=event.risk.maint_margin,
                status=event.risk.status,
                event_time=event_time if event_time is not None else self._clock(),
            )
        if event.moves_account:
            self._poller.trigger(self._name, Priority.RISK if event.is_risk else Priority.EVENT)

    def listen_key_failed(self, error: errors.BinanceError) -> None:
        self._poller.note_pause(error)


class AccountStreams:
    """The user data streams of every account `add`ed: run() until close()."""

    def __init__(
        self,
        *,
        stream_url: str,
        health: StreamHealth,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stream_url = stream_url
        self._health = health
        self._clock = clock
        self._streams: list[UserDataStream] = []

    def add(
        self, route: Route, budget: WeightBudget, poller: EgressPoller, targets: Iterable[Target]
    ) -> None:
        """A stream for each of `targets`, the accounts of `poller`, on `route`."""
        pacer = ConnectPacer()  # per route: Binance counts connection attempts per IP
        for target in targets:
            self._streams.append(
                UserDataStream(
                    account=target.name,
                    api_key=target.credentials.api_key,
                    client=poller.client,
                    stream_url=self._stream_url,
                    acquire=budget.acquire,
                    pacer=pacer,
                    observer=_AccountObserver(target.name, poller, self._health, self._clock),
                    route=route,
                )
            )

    def __len__(self) -> int:
        return len(self._streams)

    async def run(self) -> None:
        """Run every stream until cancelled or closed; one that crashes is logged, alone."""
        await asyncio.gather(*(self._run_one(s) for s in self._streams))

    async def close(self) -> None:
        """Close every stream and delete its listenKey."""
        await asyncio.gather(*(s.close() for s in self._streams), return_exceptions=True)

    @staticmethod
    async def _run_one(stream: UserDataStream) -> None:
        try:
            await stream.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the one broad boundary of a stream: REST polling goes on
            # a type name, never a traceback or message that might quote data
            log.error("stream_crashed", account=stream.account, error=type(exc).__name__)  # noqa: TRY400
