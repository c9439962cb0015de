"""The user data stream's WebSocket server: `/pm/ws/<listenKey>` on its own port and thread.

Also the combined form the official SDKs use (undocumented for PM): `/pm/stream`, then a
`{"method": "SUBSCRIBE", "params": [<listenKey>], "id": ...}` message, answered
`{"result": null, "id": ...}`; its frames come wrapped as `{"stream": <listenKey>,
"data": <event>}`. One listenKey per combined connection.

Its own port, as Binance's stream has its own host (fstream.binance.com beside
papi.binance.com), and because the threaded stdlib HTTP server cannot hand a
connection over to an asyncio WebSocket cleanly. An asyncio loop in one thread
runs the `websockets` server; other threads reach it only through
`StreamControls.push`, which hands work over with `call_soon_threadsafe`.

Per connection, one writer task sends what is pushed in order, and one pinger
pings every `ping_interval` seconds (Binance: 3 minutes) and cuts a client that
does not answer within `ping_timeout` (Binance: 10 minutes). A sweep every
`SWEEP_SECONDS` closes connections whose key expired (after `listenKeyExpired`)
or that lived `max_connection_seconds` on the simulator's clock, so tests can
reach "24 h" by moving an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from dataclasses import dataclass, field
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from exporter.simulator.events import listen_key_expired
from exporter.simulator.state import NOTICES, Push, SimState

PATH_PREFIX = "/pm/ws/"
#: the combined form: no key in the path, a SUBSCRIBE message names it
COMBINED_PATH = "/pm/stream"
#: how long a combined connection may take to send its SUBSCRIBE
SUBSCRIBE_TIMEOUT_SECONDS = 10.0
# The library logs each handshake's request line, listenKey included, at debug level;
# the demo runs the simulator in the exporter's process: a logger that emits nothing.
_SILENT_LOGGER = logging.Logger("exporter.simulator.websockets", level=logging.CRITICAL + 1)
SWEEP_SECONDS = 0.05
_JOIN_SECONDS = 5.0


@dataclass(eq=False)
class _Connection:
    ws: ServerConnection
    account: str
    listen_key: str = field(repr=False)
    opened_ms: int
    queue: asyncio.Queue[Push] = field(default_factory=asyncio.Queue)
    paused: bool = False  # reading paused: the connection plays dead
    #: opened as /pm/stream + SUBSCRIBE: frames go out wrapped in {"stream", "data"}
    combined: bool = False

    def frame(self, text: str) -> str:
        """What goes on the wire for an event's JSON `text`."""
        if not self.combined:
            return text
        return f'{{"stream":{json.dumps(self.listen_key)},"data":{text}}}'


class StreamServer:
    """The WebSocket side of the simulator; started and stopped by `Simulator`."""

    def __init__(
        self,
        state: SimState,
        host: str,
        port: int = 0,
        *,
        ping_interval: float = 180.0,
        ping_timeout: float = 600.0,
    ) -> None:
        self._state = state
        self._address = (host, port)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()  # guards the counters read from other threads
        self._pongs: dict[str, int] = {}
        self._accepted: dict[str, int] = {}
        self._peers: dict[str, list[str]] = {}
        self._refused = 0

    # -------------------------------------------------------------- life cycle

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._main(ready))
            except BaseException as error:  # surfaced by start(); the thread then ends
                failure.append(error)
                ready.set()

        self._thread = threading.Thread(target=run, name="sim-stream", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopped.set)
        if self._thread is not None:
            self._thread.join(_JOIN_SECONDS)
        self._state.stream.attach(None)

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        host, port = self._address
        async with serve(
            self._handle,
            host,
            port,
            process_request=self._process_request,
            ping_interval=None,  # the pinger below pings, or not when silent
            max_size=2**16,
            close_timeout=1.0,
            logger=_SILENT_LOGGER,
        ) as server:
            self._server = server
            self._state.stream.attach(self._from_any_thread)
            ready.set()
            sweeper = asyncio.create_task(self._sweep())
            await self._stopped.wait()
            sweeper.cancel()
            for connection in self._live():
                connection.ws.transport.abort()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("stream server not started")
        host, port = next(iter(self._server.sockets)).getsockname()[:2]
        return str(host), int(port)

    # -------------------------------------------------------------- what tests read

    def pongs(self, account: str) -> int:
        """Pongs the account's connections answered to the server's pings."""
        with self._lock:
            return self._pongs.get(account, 0)

    def accepted(self, account: str) -> int:
        """WebSocket connections of the account accepted so far."""
        with self._lock:
            return self._accepted.get(account, 0)

    def peers(self, account: str) -> list[str]:
        """The client IP of each of the account's accepted connections, oldest first."""
        with self._lock:
            return list(self._peers.get(account, []))

    @property
    def refused(self) -> int:
        with self._lock:
            return self._refused

    def open_connections(self, account: str | None = None) -> int:
        with self._lock:
            return sum(1 for c in self._connections if account in (None, c.account))

    # -------------------------------------------------------------- connections

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        status = self._state.stream.take_refusal()
        if status is not None:
            with self._lock:
                self._refused += 1
            return respond(status, "upgrade refused by the simulator\n")
        if request.path == COMBINED_PATH:
            return None  # the key comes in the SUBSCRIBE message
        answer = upgrade(self._state, request.path)
        return answer if isinstance(answer, Response) else None

    async def _handle(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request else ""
        combined = path == COMBINED_PATH
        if combined:
            subscribed = await _subscription(ws)
            if subscribed is None:
                await ws.close(1008, "expected a SUBSCRIBE with one listenKey")
                return
            key, request_id = subscribed
        else:
            key = path[len(PATH_PREFIX) :]
        account = self._state.listen_keys.account_of(key, self._state.now_ms())
        if account is None:  # expired between the upgrade check and here, or never was
            await ws.close(1008, "invalid listenKey")
            return
        if combined:
            await ws.send(json.dumps({"result": None, "id": request_id}))
        connection = _Connection(ws, account, key, self._state.now_ms(), combined=combined)
        with self._lock:
            self._connections.add(connection)
            self._accepted[account] = self._accepted.get(account, 0) + 1
            self._peers.setdefault(account, []).append(str(ws.remote_address[0]))
        if self._state.stream.is_silent(account):
            ws.transport.pause_reading()  # a dead peer: no pongs either
            connection.paused = True
        writer = asyncio.create_task(self._write(connection))
        pinger = asyncio.create_task(self._ping(connection))
        try:
            await ws.wait_closed()
        finally:
            writer.cancel()
            pinger.cancel()
            with self._lock:
                self._connections.discard(connection)

    async def _write(self, connection: _Connection) -> None:
        ws = connection.ws
        with contextlib.suppress(ConnectionClosed):
            while True:
                push = await connection.queue.get()
                if push.kind == "drop":
                    ws.transport.abort()
                    return
                if push.kind == "expired":
                    await ws.send(connection.frame(push.text))
                    await ws.close(1000, "listenKey expired")
                    return
                if not self._state.stream.is_silent(connection.account):
                    await ws.send(connection.frame(push.text))

    async def _ping(self, connection: _Connection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(self.ping_interval)
                if self._state.stream.is_silent(connection.account):
                    continue
                pong = await connection.ws.ping()
                try:
                    await asyncio.wait_for(pong, self.ping_timeout)
                except TimeoutError:
                    connection.ws.transport.abort()
                    return
                with self._lock:
                    self._pongs[connection.account] = self._pongs.get(connection.account, 0) + 1

    async def _sweep(self) -> None:
        stream = self._state.stream
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            for account, push in expired_keys(self._state):
                self._deliver(account, push)
            now_ms = self._state.now_ms()
            max_ms = stream.max_connection_seconds * 1000
            for connection in self._live():
                silent = stream.is_silent(connection.account)
                if silent != connection.paused:
                    connection.paused = silent
                    transport = connection.ws.transport
                    if silent:
                        transport.pause_reading()
                    else:
                        transport.resume_reading()
                if now_ms - connection.opened_ms >= max_ms:
                    with self._lock:
                        self._connections.discard(connection)
                    await connection.ws.close(1000, "connection lived its maximum age")

    def _live(self) -> list[_Connection]:
        with self._lock:
            return list(self._connections)

    def _from_any_thread(self, account: str | None, push: Push) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._deliver, account, push)

    def _deliver(self, account: str | None, push: Push) -> None:
        if push.kind in NOTICES:
            return  # the sweep reads the settings every SWEEP_SECONDS
        for connection in self._live():
            if account is not None and connection.account != account:
                continue
            if push.kind == "expired" and connection.listen_key != push.listen_key:
                continue
            connection.queue.put_nowait(push)


async def _subscription(ws: ServerConnection) -> tuple[str, object] | None:
    """(listenKey, request id) of a combined connection's first message, if it is a
    SUBSCRIBE naming one key; None for anything else or nothing in time."""
    try:
        message = await asyncio.wait_for(ws.recv(), SUBSCRIBE_TIMEOUT_SECONDS)
        request = json.loads(message)
    except (TimeoutError, ConnectionClosed, ValueError):
        return None
    if not isinstance(request, dict) or request.get("method") != "SUBSCRIBE":
        return None
    params = request.get("params")
    if not isinstance(params, list) or len(params) != 1 or not isinstance(params[0], str):
        return None
    return params[0], request.get("id")


def respond(status: int, text: str) -> Response:
    """The server's plain-text answer to an upgrade it refuses."""
    body = text.encode()
    headers = Headers(
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    )
    return Response(status, HTTPStatus(status).phrase, headers, body)


def upgrade(state: SimState, path: str) -> tuple[str, str] | Response:
    """The (account, listenKey) a connection to `path` (`<PATH_PREFIX><listenKey>`)
    streams, or the refusal: 404 for another path, 400 for a key not live now."""
    if not path.startswith(PATH_PREFIX):
        return respond(404, "not found\n")
    key = path[len(PATH_PREFIX) :]
    account = state.listen_keys.account_of(key, state.now_ms())
    if account is None:
        return respond(400, "invalid listenKey\n")  # never echo the key
    return account, key


def expired_keys(state: SimState) -> list[tuple[str, Push]]:
    """The listenKeyExpired pushes, by account, of the keys past their 60 minutes now
    (taken: each key's once)."""
    now_ms = state.now_ms()
    text = json.dumps(listen_key_expired(now_ms), separators=(",", ":"))
    return [
        (account, Push("expired", text, key))
        for account, key in state.listen_keys.take_expired(now_ms)
    ]
