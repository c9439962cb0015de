"""Every account's user data stream, wired to the poller of its route.

The stream tells the exporter when and where to look; REST stays the source of truth.
Each account gets one `UserDataStream` through its own route: the listenKey calls go
through its poller's client (counted like every request, endpoint `listen_key`) after
that route's budget lets them (1 weight each, pauses obeyed), and WebSocket connection
attempts of one route share one `ConnectPacer`. What a stream reports becomes:

- a balance- or risk-moving event: a triggered refresh of the endpoints it moved, RISK
  or EVENT as `exporter.triggers.classify` reads its figures and the account's snapshot;
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
from exporter.binance.stream import (
    DEFAULT_TIMINGS,
    Connect,
    ConnectPacer,
    Sleep,
    StreamObserver,
    StreamTimings,
    UserDataStream,
    websocket_connect,
)
from exporter.budget import WeightBudget
from exporter.clock import finish_within
from exporter.poller import EgressPoller, Target
from exporter.route import Route
from exporter.selfmetrics import StreamHealth
from exporter.triggers import BOTH, Priority, books_moved, classify

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
            self._poller.trigger(self._name, Priority.CATCHUP, BOTH)
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
        need = classify(event, self._poller.snapshot_of(self._name))
        if need is not None:
            endpoints = need.endpoints | books_moved(event)
            self._poller.trigger(self._name, need.priority, endpoints, event_time)

    def stream_frame_rejected(self, reason: str) -> None:
        self._health.frame_rejected(self._name)

    def listen_key_failed(self, error: errors.BinanceError) -> None:
        self._poller.note_pause(error)


class AccountStreams:
    """The user data stream of every account, kept in step with the pollers by `sync`.

    An account keeps its stream while its target (credentials) and poller (route and
    client) stay the same objects, as they do across a reload that leaves it unchanged;
    otherwise its old stream is closed (its listenKey deleted) and a new one starts.
    """

    def __init__(
        self,
        *,
        stream_url: str,
        health: StreamHealth,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        timings: StreamTimings = DEFAULT_TIMINGS,
        connect: Connect = websocket_connect,
    ) -> None:
        self._stream_url = stream_url
        self._health = health
        self._clock = clock
        self._sleep = sleep
        self._timings = timings
        #: how each stream opens its WebSocket (tests: the simulator in-process)
        self._connect = connect
        #: route -> the pacer of its connection attempts (Binance counts them per IP)
        self._pacers: dict[Route, ConnectPacer] = {}
        #: account -> (target, poller, stream, its task)
        self._running: dict[str, tuple[Target, EgressPoller, UserDataStream, asyncio.Task[None]]]
        self._running = {}
        self._closing: set[asyncio.Task[None]] = set()

    def sync(
        self, egresses: Iterable[tuple[Route, WeightBudget, EgressPoller, Iterable[Target]]]
    ) -> None:
        """Run a stream for each target of each (route, budget, poller, targets), and none
        for any other account; call in the event loop."""
        wanted: dict[str, tuple[Route, WeightBudget, EgressPoller, Target]] = {
            target.name: (route, budget, poller, target)
            for route, budget, poller, targets in egresses
            for target in targets
        }
        for name, (target, poller, stream, task) in list(self._running.items()):
            new = wanted.get(name)
            if new is None or new[3] is not target or new[2] is not poller:
                del self._running[name]
                self._retire(stream, task)
            if new is None:
                self._health.forget(name)
        self._pacers = {
            route: self._pacers.get(route) or self._pacer() for route, *_ in wanted.values()
        }
        for name, (route, budget, poller, target) in wanted.items():
            if name in self._running:
                continue
            stream = UserDataStream(
                account=name,
                api_key=target.credentials.api_key,
                client=poller.client,
                stream_url=self._stream_url,
                acquire=budget.acquire,
                pacer=self._pacers[route],
                observer=_AccountObserver(name, poller, self._health, self._clock),
                route=route,
                timings=self._timings,
                clock=self._clock,
                sleep=self._sleep,
                connect=self._connect,
            )
            task = asyncio.create_task(_run(stream), name=f"stream {name}")
            self._running[name] = (target, poller, stream, task)

    def _pacer(self) -> ConnectPacer:
        timings = self._timings
        return ConnectPacer(
            timings.pacer_attempts,
            timings.pacer_window_seconds,
            clock=self._clock,
            sleep=self._sleep,
        )

    def __len__(self) -> int:
        return len(self._running)

    async def close(self, grace: float) -> None:
        """Close every stream, each deleting its listenKey, within `grace` seconds (on the
        clock)."""
        for name, (_, _, stream, task) in list(self._running.items()):
            del self._running[name]
            self._retire(stream, task)
        await finish_within(self._closing, grace, self._sleep)

    def _retire(self, stream: UserDataStream, task: asyncio.Task[None]) -> None:
        # close() lets run() delete the key; the task ends when it has
        for ending in (task, asyncio.create_task(stream.close())):
            self._closing.add(ending)
            ending.add_done_callback(self._closing.discard)


async def _run(stream: UserDataStream) -> None:
    try:
        await stream.run()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the one broad boundary of a stream: REST polling goes on
        # a type name, never a traceback or message that might quote data
        log.error("stream_crashed", account=stream.account, error=type(exc).__name__)  # noqa: TRY400
