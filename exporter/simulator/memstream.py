"""The simulator's user data stream in-process: connections that are objects, not sockets.

`SimStream(state, clock).connect(url, route, timings)` is what the exporter's stream
client calls instead of opening a WebSocket (its `connect` seam). It accepts or refuses
the connection as the stream server (stream.py) would, and returns the client's end: the
frames pushed to the account, in order, until the connection ends, the way a `websockets`
client connection ends and with the same exceptions:

- a refused upgrade (the `refuse_upgrades` fault, an unknown listenKey): `InvalidStatus`;
- `drop`: `ConnectionClosedError` with no close frame either way;
- `expire_key` and a key past its 60 minutes: the listenKeyExpired event, then a close 1000;
- the maximum age (24 h, or the `max_age` fault): a close 1000, exactly at that age;
- a frame over the client's `max_frame_bytes` (`big_frame`): a close 1009;
- `silent`: no events, and the client's pings go unanswered: after `ping_interval_seconds`
  and then `ping_timeout_seconds` of silence, a close 1011, as websockets' keepalive does.

Time is the `clock` given (the virtual one in tests): the 24 h close, the key's expiry
and the pings are sleeps on it, so a day of a stream's life takes a moment. The state's
pushes (events, faults) must come from the event loop's thread, as they do in a test that
drives the simulator in-process. Use either this or the WebSocket server, not both: each
takes the state's pushes for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import urlsplit

from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidStatus,
)
from websockets.frames import Close
from websockets.http11 import Response

from exporter.simulator.state import Push, SimState
from exporter.simulator.stream import PATH_PREFIX, expired_keys, respond, upgrade
from exporter.simulator.transport import Clock

#: the stream's base URL for an in-process client: the host is never resolved
URL = "ws://sim.test" + PATH_PREFIX.rstrip("/")


class Egress(Protocol):
    """Where a connection comes from (an exporter.route.Route): its source address."""

    @property
    def source_address(self) -> str | None: ...


class ClientTimings(Protocol):
    """What of the client's settings shapes a connection (exporter's StreamTimings)."""

    @property
    def max_frame_bytes(self) -> int: ...

    @property
    def ping_interval_seconds(self) -> float: ...

    @property
    def ping_timeout_seconds(self) -> float: ...


class SimStream:
    """The stream's server side in-process, for every account of `state`, on `clock`."""

    def __init__(self, state: SimState, clock: Clock, client_ip: str = "127.0.0.1") -> None:
        self._state = state
        self._clock = clock
        self._client_ip = client_ip
        self._connections: list[MemConnection] = []
        self._accepted: dict[str, int] = {}
        self._peers: dict[str, list[str]] = {}
        self.refused = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._look_again = asyncio.Event()
        state.stream.attach(self._deliver)

    url = URL

    # -------------------------------------------------------------- what tests read

    def accepted(self, account: str) -> int:
        """Connections of the account accepted so far."""
        return self._accepted.get(account, 0)

    def peers(self, account: str) -> list[str]:
        """The client IP of each of the account's accepted connections, oldest first."""
        return list(self._peers.get(account, []))

    def open_connections(self, account: str | None = None) -> int:
        return sum(1 for c in self._connections if account in (None, c.account))

    # -------------------------------------------------------------- the client's seam

    async def connect(self, url: str, route: Egress, timings: ClientTimings) -> MemConnection:
        """Open a connection to `url` (`<URL>/<listenKey>`), as `route` would from its
        source address; raises `InvalidStatus` where the server refuses the upgrade."""
        status = self._state.stream.take_refusal()
        if status is not None:
            self.refused += 1
            raise InvalidStatus(respond(status, "upgrade refused by the simulator\n"))
        answer = upgrade(self._state, urlsplit(url).path)
        if isinstance(answer, Response):
            raise InvalidStatus(answer)
        account, key = answer
        connection = MemConnection(self, self._clock, account, key, timings)
        self._connections.append(connection)
        self._accepted[account] = self._accepted.get(account, 0) + 1
        self._peers.setdefault(account, []).append(route.source_address or self._client_ip)
        connection.start()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="sim-stream-sweep")
        self._look_again.set()
        return connection

    async def aclose(self) -> None:
        """End every connection (as a drop) and the sweep."""
        for connection in list(self._connections):
            connection.end(ConnectionClosedError(None, None))
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    # -------------------------------------------------------------- the server's side

    def is_silent(self, account: str) -> bool:
        return self._state.stream.is_silent(account)

    def forget(self, connection: MemConnection) -> None:
        with contextlib.suppress(ValueError):
            self._connections.remove(connection)

    def _deliver(self, account: str | None, push: Push) -> None:
        if push.kind == "max_age":
            self._look_again.set()
            return
        for connection in list(self._connections):
            if account is not None and connection.account != account:
                continue
            if push.kind == "expired" and connection.listen_key != push.listen_key:
                continue
            connection.push(push)

    async def _sweep(self) -> None:
        """Close connections at their maximum age and on expired keys, each exactly when
        it is due: sleep until the next one, or until told to look again."""
        stream, keys = self._state.stream, self._state.listen_keys
        while True:
            self._look_again.clear()
            for account, push in expired_keys(self._state):
                self._deliver(account, push)
            now_ms = self._state.now_ms()
            now = self._clock.now()
            due = [c.opened + stream.max_connection_seconds for c in self._connections]
            for connection, at in zip(list(self._connections), due, strict=True):
                if now >= at:
                    connection.end(_closed(1000, "connection lived its maximum age"))
            waits = [at - now for at in due if at > now]
            if (expiry_ms := keys.next_expiry_ms()) is not None:
                waits.append(max((expiry_ms - now_ms) / 1000, 0.001))
            look_again = asyncio.ensure_future(self._look_again.wait())
            sleeping = asyncio.ensure_future(self._clock.sleep(min(waits))) if waits else None
            try:
                await asyncio.wait(
                    [t for t in (look_again, sleeping) if t is not None],
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                look_again.cancel()
                if sleeping is not None:
                    sleeping.cancel()


class MemConnection:
    """One open connection, the client's end (an exporter StreamConnection)."""

    def __init__(
        self,
        server: SimStream,
        clock: Clock,
        account: str,
        listen_key: str,
        timings: ClientTimings,
    ) -> None:
        self._server = server
        self._clock = clock
        self.account = account
        self.listen_key = listen_key
        self.opened = clock.now()
        self._timings = timings
        self._frames: asyncio.Queue[str | ConnectionClosed] = asyncio.Queue()
        self._ended: ConnectionClosed | None = None
        self._pinger: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"MemConnection(account={self.account!r})"  # never the key

    def start(self) -> None:
        if self._server.is_silent(self.account):
            self._start_pinging()

    def _start_pinging(self) -> None:
        """Our pings matter only while the server is silent: follow them from now on."""
        if self._pinger is None or self._pinger.done():
            self._pinger = asyncio.create_task(self._ping(), name="sim-stream-ping")

    # -------------------------------------------------------------- the client reads

    async def recv(self) -> str:
        """The next frame; raises `ConnectionClosed` once the connection has ended."""
        if self._ended is not None:
            raise self._ended
        item = await self._frames.get()
        if isinstance(item, ConnectionClosed):
            raise item
        if len(item.encode()) > self._timings.max_frame_bytes:
            too_big = _closed(1009, "frame too big", sent_first=True)
            self.end(too_big)
            raise too_big
        return item

    async def _iterate(self) -> AsyncIterator[str]:
        try:
            while True:
                yield await self.recv()
        except ConnectionClosedOK:
            return

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def close(self) -> None:
        """The client's close handshake: the server answers at once."""
        if self._ended is None:
            self.end(_closed(1000, "", sent_first=True))

    # -------------------------------------------------------------- the server writes

    def push(self, push: Push) -> None:
        if self._ended is not None:
            return
        if push.kind == "silent":
            self._start_pinging()
        elif push.kind == "drop":
            self.end(ConnectionClosedError(None, None))
        elif push.kind == "expired":
            self._frames.put_nowait(push.text)
            self.end(_closed(1000, "listenKey expired"))
        elif not self._server.is_silent(self.account):
            self._frames.put_nowait(push.text)

    def end(self, how: ConnectionClosed) -> None:
        """The connection is over: the reader gets `how` after what was sent before it."""
        if self._ended is not None:
            return
        self._ended = how
        self._frames.put_nowait(how)
        self._server.forget(self)
        if self._pinger is not None and self._pinger is not _current_task():
            self._pinger.cancel()

    async def _ping(self) -> None:
        """The client's keepalive while the server is silent: websockets pings every
        interval from the connection's start; one unanswered within the timeout (the
        server's reading paused) fails the connection. A ping answered ends the watch."""
        interval, timeout = self._timings.ping_interval_seconds, self._timings.ping_timeout_seconds
        while self._ended is None and self._server.is_silent(self.account):
            age = self._clock.now() - self.opened
            await self._clock.sleep(max(1, math.ceil(age / interval)) * interval - age)
            if not self._server.is_silent(self.account):
                return  # this ping is answered
            await self._clock.sleep(timeout)
            if self._server.is_silent(self.account):
                self.end(ConnectionClosedError(None, Close(1011, "keepalive ping timeout")))
                return


def _current_task() -> asyncio.Task[object] | None:
    with contextlib.suppress(RuntimeError):
        return asyncio.current_task()
    return None


def _closed(code: int, reason: str, *, sent_first: bool = False) -> ConnectionClosed:
    """A close handshake completed both ways with `code`: OK for 1000/1001, as websockets."""
    frame = Close(code, reason)
    kind = ConnectionClosedOK if code in (1000, 1001) else ConnectionClosedError
    return kind(frame, frame, rcvd_then_sent=not sent_first)


__all__ = ["URL", "MemConnection", "SimStream"]
