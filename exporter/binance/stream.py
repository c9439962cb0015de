"""One account's PM user data stream: the listenKey's life and a WebSocket kept open.

`UserDataStream.run()` creates the listenKey (POST), keeps it alive (PUT every
30 minutes), connects to `<stream_url>/<listenKey>` through the account's own
egress (proxy or source address), passes each parsed event to its observer, and
reconnects on any drop with jittered exponential backoff, proactively before
Binance's 24 h limit, and at once with a new key after `listenKeyExpired` or a
-1125 on keep-alive. `close()` ends it and deletes the key.

It reports, never decides: events and (dis)connections go to a `StreamObserver`,
listenKey requests go through the caller's `BinanceClient` (so they are reported
like every other request, endpoint "listen_key") after the caller's `acquire`
(so they spend 1 weight each from the egress's budget and wait out its pauses).
Connection attempts of every stream on one egress share a `ConnectPacer`.

The listenKey is a bearer token for the account's private events: it lives in a
SecretStr and in the URL given to the WebSocket library only, whose own logging
is switched off; logs name exception types, never their text.

Where the WebSocket comes from is a seam: `connect(url, route, timings)` returns an open
`StreamConnection`. Production connects with `websockets` through the route
(`websocket_connect`); tests pass the simulator's in-process stream
(exporter/simulator/memstream.py), which raises the same `websockets` exceptions, so the
whole life cycle runs on a virtual clock without a socket.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from exporter.binance import errors
from exporter.binance.client import BinanceClient
from exporter.binance.events import LISTEN_KEY_EXPIRED, MalformedFrame, StreamEvent, parse_frame
from exporter.route import DEFAULT, Route
from exporter.throttle import LogThrottle
from exporter.weights import WEIGHTS

log = structlog.get_logger("exporter.stream")

Sleep = Callable[[float], Awaitable[None]]
#: waits until `weight` may be spent from the egress's budget (and its pauses are over)
Acquire = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class StreamTimings:
    """How long a stream waits for what (and the one size it caps): Binance's values by
    default. Every wait is a sleep on the stream's clock (the pings and the close
    handshake are the WebSocket library's, handed over by `websocket_connect`), so tests
    on a virtual clock run with these values as they are."""

    keepalive_seconds: float = 30 * 60.0  # a key lives 60 minutes
    #: after a failed keep-alive: the key has 30 of its 60 minutes left, try again soon
    keepalive_retry_seconds: float = 60.0
    #: reconnect before Binance closes a connection at 24 h
    max_connection_seconds: float = 23 * 3600.0
    backoff_initial_seconds: float = 1.0
    backoff_cap_seconds: float = 120.0
    #: a connection that stayed up this long resets the backoff
    stable_seconds: float = 60.0
    #: frames above this close the connection (1009) and count as a drop; Binance's
    #: events are a few kB, an ACCOUNT_UPDATE with hundreds of positions some tens of kB
    max_frame_bytes: int = 256 * 1024
    #: our pings; Binance pings every 3 minutes and drops a client silent for 10
    ping_interval_seconds: float = 60.0
    ping_timeout_seconds: float = 30.0
    open_timeout_seconds: float = 10.0
    #: how long our close handshake waits for the server's
    close_timeout_seconds: float = 2.0
    #: how long close() waits for the listenKey's DELETE (the key expires on its own)
    delete_timeout_seconds: float = 10.0
    #: Binance allows about 300 connection attempts per 5 minutes per IP; stay well under:
    #: at most this many attempts per window, per egress (`ConnectPacer`)
    pacer_attempts: int = 200
    pacer_window_seconds: float = 300.0


#: what production runs with
DEFAULT_TIMINGS = StreamTimings()

#: why a connection ended or could not start: the `reason` label's values
REASONS = (
    "listen_key_failed",  # the POST failed: no key to connect with
    "connect_failed",  # TCP, TLS, proxy or timeout before the upgrade
    "refused",  # the server answered the upgrade with an HTTP status
    "dropped",  # the connection broke without a close handshake
    "closed",  # the server closed it (as Binance does at 24 h)
    "ping_timeout",  # our pings went unanswered: a silent peer
    "frame_too_big",  # a frame over the size cap
    "key_expired",  # listenKeyExpired
    "key_unknown",  # -1125 on keep-alive
    "max_age",  # our own reconnect before 24 h
    "shutdown",  # close()
)
#: planned reconnects: none of the backoff after a stable connection (the pacer still applies)
_PLANNED = frozenset({"key_expired", "key_unknown", "max_age"})

# The WebSocket library logs each handshake's request line (with the listenKey) at
# debug level: it gets a logger of its own that emits nothing, registered nowhere.
_SILENT_LOGGER = logging.Logger("exporter.stream.websockets", level=logging.CRITICAL + 1)


class StreamConnection(Protocol):
    """An open WebSocket, as much of it as a stream reads: its frames, until it ends.

    Iteration ends when the peer closes normally; any other end raises
    `websockets.exceptions.ConnectionClosed` (with the close frames sent and received).
    """

    def __aiter__(self) -> AsyncIterator[str | bytes]: ...

    async def close(self) -> None: ...


#: opens `url` by `route` with `timings` (sizes, pings, timeouts); raises InvalidStatus
#: (refused upgrade), OSError, TimeoutError or another WebSocketException on failure
Connect = Callable[[str, Route, StreamTimings], Awaitable[StreamConnection]]


async def websocket_connect(url: str, route: Route, timings: StreamTimings) -> StreamConnection:
    """A real WebSocket to `url` through the route's proxy, from its source address."""
    return await connect(
        url,
        proxy=route.proxy,  # None: no proxy, whatever the environment says
        local_addr=(source, 0) if (source := route.source_address) else None,
        user_agent_header="binance-pm-exporter",
        compression=None,  # events are small; deflate costs ~60 kB per connection
        open_timeout=timings.open_timeout_seconds,
        ping_interval=timings.ping_interval_seconds,
        ping_timeout=timings.ping_timeout_seconds,
        close_timeout=timings.close_timeout_seconds,
        max_size=timings.max_frame_bytes,
        logger=_SILENT_LOGGER,
    )


class StreamObserver:
    """What a stream reports; override what you need (the poller, metrics, tests)."""

    def stream_connected(self) -> None:
        """The WebSocket is open: events missed before are lost, refresh over REST."""

    def stream_disconnected(self, reason: str) -> None:
        """The connection ended or could not start; `reason` is one of REASONS."""

    def stream_event(self, event: StreamEvent) -> None:
        """An event arrived (unknown types too, as kind "other")."""

    def stream_frame_rejected(self, reason: str) -> None:
        """A frame was not an event ("malformed"); the connection goes on."""

    def listen_key_failed(self, error: errors.BinanceError) -> None:
        """A listenKey request failed; on 429/418 the caller pauses the egress."""


class ConnectPacer:
    """At most `attempts` WebSocket connection attempts per `window_seconds`, per egress.

    A sliding log: a burst (every account at start) goes through at once up to
    the limit, and the rest wait for the oldest attempts to leave the window.
    """

    def __init__(
        self,
        attempts: int = DEFAULT_TIMINGS.pacer_attempts,
        window_seconds: float = DEFAULT_TIMINGS.pacer_window_seconds,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if attempts < 1 or window_seconds <= 0:
            raise ValueError("a pacer needs attempts >= 1 and a positive window")
        self.attempts = attempts
        self.window_seconds = window_seconds
        self._clock = clock
        self._sleep = sleep
        self._log: deque[float] = deque()

    def delay(self, now: float) -> float:
        while self._log and self._log[0] <= now - self.window_seconds:
            self._log.popleft()
        if len(self._log) < self.attempts:
            return 0.0
        return self._log[0] + self.window_seconds - now

    async def acquire(self) -> None:
        """Wait for a free slot in the window, then take it."""
        while (wait := self.delay(self._clock())) > 0:
            await self._sleep(wait)
        self._log.append(self._clock())


def backoff_seconds(failures: int, rng: random.Random, initial: float, cap: float) -> float:
    """Exponential, capped, with "equal jitter": between half and all of the step."""
    step = min(cap, initial * 2.0 ** max(0, failures - 1))
    return step / 2 + rng.uniform(0, step / 2)


class UserDataStream:
    """The user data stream of ONE account; run() until close()."""

    def __init__(
        self,
        *,
        account: str,
        api_key: SecretStr,
        client: BinanceClient,
        stream_url: str,
        acquire: Acquire,
        pacer: ConnectPacer,
        observer: StreamObserver | None = None,
        route: Route = DEFAULT,
        timings: StreamTimings = DEFAULT_TIMINGS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        connect: Connect = websocket_connect,
    ) -> None:
        self.account = account
        self._api_key = api_key
        self._client = client
        self._stream_url = stream_url.rstrip("/")
        self._acquire = acquire
        self._pacer = pacer
        self._observer = observer or StreamObserver()
        self._route = route
        self._timings = timings
        self._clock = clock
        self._sleep = sleep
        self._connect = connect
        #: malformed frames: one line a minute, with the count held back (not one a frame)
        self._rejected_log = LogThrottle(clock=clock)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._key: SecretStr | None = None
        self._stopping = asyncio.Event()
        #: set by a -1125 on keep-alive: the connection's key is gone
        self._key_unknown = asyncio.Event()
        self.connected = False

    def __repr__(self) -> str:
        return f"UserDataStream(account={self.account!r}, connected={self.connected})"

    # -------------------------------------------------------------- life cycle

    async def run(self) -> None:
        """Keep the stream open until close(); then delete the listenKey."""
        keeper = asyncio.create_task(self._keep_alive())
        failures = 0
        try:
            while not self._stopping.is_set():
                reason, lived = await self._connect_once()
                self._observer.stream_disconnected(reason)
                if self._stopping.is_set():
                    break
                if lived is not None and lived >= self._timings.stable_seconds:
                    failures = 0
                failures += 1
                if reason in _PLANNED and failures == 1:
                    continue  # at once, unless it keeps happening
                delay = backoff_seconds(
                    failures,
                    self._rng,
                    self._timings.backoff_initial_seconds,
                    self._timings.backoff_cap_seconds,
                )
                log.info(
                    "stream_reconnecting",
                    account=self.account,
                    reason=reason,
                    in_seconds=round(delay, 3),
                )
                await self._unless_stopped(self._sleep(delay))
        finally:
            keeper.cancel()
            await self._delete_key()

    async def close(self) -> None:
        """Ask run() to end; it closes the connection and deletes the key."""
        self._stopping.set()

    # -------------------------------------------------------------- one connection

    async def _connect_once(self) -> tuple[str, float | None]:
        """Connect, read until the connection ends; (reason, seconds it lived or None)."""
        if self._key is None:
            opening = asyncio.ensure_future(self._listen_key("open"))
            if not await self._unless_stopped(opening):
                return "shutdown", None
            error = opening.exception()
            if isinstance(error, errors.BinanceError):
                return "listen_key_failed", None  # logged and reported by _listen_key
            if error is not None:
                raise error
            self._key = opening.result()
        if not await self._unless_stopped(self._pacer.acquire()):
            return "shutdown", None
        key = self._key
        try:
            ws = await self._connect(
                f"{self._stream_url}/{key.get_secret_value()}", self._route, self._timings
            )
        except InvalidStatus as exc:
            # Refused upgrade: perhaps the key died. POST again (the same key if alive).
            self._key = None
            log.warning(
                "stream_refused",
                account=self.account,
                status=exc.response.status_code,
            )
            return "refused", None
        except (OSError, TimeoutError, WebSocketException) as exc:
            log.warning("stream_connect_failed", account=self.account, error=type(exc).__name__)
            return "connect_failed", None
        started = self._clock()
        self.connected = True
        log.info("stream_connected", account=self.account)
        self._observer.stream_connected()
        try:
            reason = await self._serve(ws)
        finally:
            self.connected = False
            await ws.close()
        lived = self._clock() - started
        log.info("stream_disconnected", account=self.account, reason=reason)
        return reason, lived

    async def _serve(self, ws: StreamConnection) -> str:
        """Read until the connection ends, the key dies, it gets too old or we stop."""
        self._key_unknown.clear()  # one set between connections needs no action: no key now
        reader = asyncio.create_task(self._read(ws))
        aging = asyncio.ensure_future(self._sleep(self._timings.max_connection_seconds))
        stopped = asyncio.create_task(self._stopping.wait())
        key_unknown = asyncio.create_task(self._key_unknown.wait())
        tasks = (reader, aging, stopped, key_unknown)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        if reader.done() and not reader.cancelled():
            return reader.result()
        if stopped.done() and not stopped.cancelled():
            return "shutdown"
        if key_unknown.done() and not key_unknown.cancelled():
            return "key_unknown"
        return "max_age"

    async def _read(self, ws: StreamConnection) -> str:
        try:
            async for frame in ws:
                try:
                    event = parse_frame(frame)
                except MalformedFrame as exc:
                    self._observer.stream_frame_rejected("malformed")
                    if (held_back := self._rejected_log.allow(None)) is not None:
                        log.warning(
                            "stream_frame_rejected",
                            account=self.account,
                            problem=str(exc),
                            lines_held_back=held_back,
                        )
                    continue
                self._observer.stream_event(event)
                if event.kind == LISTEN_KEY_EXPIRED:
                    self._key = None
                    return "key_expired"
        except ConnectionClosed as exc:
            return _closed_reason(exc)
        return "closed"

    # -------------------------------------------------------------- the listenKey

    async def _keep_alive(self) -> None:
        wait = self._timings.keepalive_seconds
        while True:
            await self._sleep(wait)
            wait = self._timings.keepalive_seconds
            if self._key is None:
                continue
            try:
                await self._listen_key("keep")
            except errors.ApiError as exc:
                if exc.code == errors.LISTEN_KEY_DOES_NOT_EXIST:
                    self._key = None
                    self._key_unknown.set()
                else:
                    wait = min(wait, self._timings.keepalive_retry_seconds)
            except errors.BinanceError:  # reported
                wait = min(wait, self._timings.keepalive_retry_seconds)

    async def _listen_key(self, action: str) -> Any:
        await self._acquire(WEIGHTS["listen_key"])
        call = {
            "open": self._client.open_listen_key,
            "keep": self._client.keep_listen_key,
            "close": self._client.close_listen_key,
        }[action]
        try:
            return await call(self._api_key)
        except errors.BinanceError as exc:
            log.warning(
                "listen_key_failed",
                account=self.account,
                action=action,
                outcome=exc.outcome,
                error=str(exc),
            )
            self._observer.listen_key_failed(exc)
            raise

    async def _delete_key(self) -> None:
        if self._key is None:
            return
        self._key = None
        deleting = asyncio.ensure_future(self._listen_key("close"))
        timeout = asyncio.ensure_future(self._sleep(self._timings.delete_timeout_seconds))
        try:
            await asyncio.wait((deleting, timeout), return_when=asyncio.FIRST_COMPLETED)
        finally:
            deleting.cancel()
            timeout.cancel()
        if deleting.done() and not deleting.cancelled():
            error = deleting.exception()
            if error is not None and not isinstance(error, errors.BinanceError):
                raise error
        # a failure is logged; the key expires on its own within 60 minutes

    async def _unless_stopped(self, waiting: Awaitable[Any]) -> bool:
        """Await `waiting` unless close() comes first (then cancel it); True when it ended."""
        task = asyncio.ensure_future(waiting)
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            task.cancel()
            stop.cancel()
        return task.done() and not task.cancelled()


def _closed_reason(exc: ConnectionClosed) -> str:
    sent = exc.sent.code if exc.sent is not None else None
    if sent == 1009:
        return "frame_too_big"
    if sent == 1011:
        return "ping_timeout"  # websockets closes with 1011 when a ping goes unanswered
    if exc.rcvd is None:
        return "dropped"
    return "closed"
