"""The HTTP server: an event loop in a thread of its own, joining the parts.

Scrapes read the current snapshot and live counters; they never wait on the
poller, on Binance or on a reload. Connections (`protocol`) reach the rest only
through the `Host` this module implements: the connection table (`limits`), the
auth gate (`auth`), the endpoints (`endpoints`) and the TLS bounds (`tls`).
/metrics is rendered in WORKERS threads (one body built at a time); bcrypt,
reloads and the web config's watcher each have a thread of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Callable

import structlog

from exporter.http.auth import AuthGate, Check
from exporter.http.endpoints import PUBLIC_PATHS, ExporterApp
from exporter.http.limits import Acceptor, ConnectionTable, ServerLimits, listen
from exporter.http.messages import Request, Response, text_response
from exporter.http.protocol import Connection
from exporter.http.quick import refused_at_once
from exporter.http.site import WebConfig
from exporter.http.tls import HANDSHAKE_STALE_SECONDS, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES
from exporter.http.watch import WEB_CONFIG_TIMEOUT_SECONDS, WebConfigWatcher

log = structlog.get_logger("exporter.http")


#: threads rendering and sending /metrics at once: enough to use every core for the
#: kernel's copying; more only crowd out the pollers' thread (bench/load.py, wrk -c64)
WORKERS = 4
#: how much nicer the HTTP threads are than the pollers' (0-19)
HTTP_NICE = 10

#: `route`'s placeholders, made final by `produce`: /metrics rendered in a worker thread,
#: and a reload's verdict
RENDER = Response(200, [], [])
RELOAD = Response(200, [], [])
TOO_MANY_REQUESTS = text_response(503, "too many requests in flight\n", ("Retry-After", "1"))


class _Server:
    """The connections of one listening socket, on the loop of the HTTP thread (the
    connections' `Host`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        app: ExporterApp,
        ssl_context: ssl.SSLContext | None,
        limits: ServerLimits,
        *,
        web_source: Callable[[], WebConfig] | None = None,
        on_stuck: Callable[[], None] | None = None,
        web_timeout: float = WEB_CONFIG_TIMEOUT_SECONDS,
    ) -> None:
        self.loop = loop
        self.app = app
        self.ssl_context = ssl_context
        self.max_header_bytes = limits.max_header_bytes
        self.read_header_timeout = limits.read_header_timeout
        self.extra_headers = list(app.web.headers.items())
        self.table = ConnectionTable(limits)
        self.gate = AuthGate(app.web.basic_auth, nice=yield_to_the_pollers)
        self.acceptor = Acceptor(loop, sock, self.table, self._take)
        self._sock = sock
        self._web = app.web
        #: re-reads `--web.config.file` when given its `web_source`
        self.watcher = (
            WebConfigWatcher(
                loop, web_source, self._use_web_config, on_stuck=on_stuck, timeout=web_timeout
            )
            if web_source is not None
            else None
        )
        #: connections in their TLS handshake, with when it started (oldest first)
        self._handshaking: dict[Connection, float] = {}
        self._stale_timer: asyncio.TimerHandle | None = None
        #: connections waiting for a handshake turn, with their sockets (newest last)
        self._handshake_queue: dict[Connection, socket.socket] = {}
        self._closed = False
        #: held while a /metrics body is built (see `_build`)
        self._building = threading.Lock()
        #: /metrics renders and large writes; more in flight wait their turn
        self.workers = concurrent.futures.ThreadPoolExecutor(
            min(limits.max_requests, WORKERS),
            thread_name_prefix="http-worker",
            initializer=yield_to_the_pollers,
        )

    # accepting, and TLS

    def _take(self, conn: socket.socket, peer: str) -> None:
        context = self.ssl_context
        connection = Connection(self, conn, peer, tls=context is not None)
        if context is None and refused_at_once(connection, self, peer):
            return
        self.table.open.add(connection)
        connection.start_clock()  # waiting for bytes and the handshake count toward it
        if context is None:
            self.loop.create_task(self._attach(conn, connection, None))
        else:
            connection.when_readable(lambda: self._handshake(conn, connection, context))

    def _handshake(
        self, conn: socket.socket, connection: Connection, context: ssl.SSLContext
    ) -> None:
        """Start `connection`'s TLS handshake, or queue it while MAX_HANDSHAKES run. Under
        a crowd of stalled handshakes, the oldest, once past HANDSHAKE_STALE_SECONDS, makes
        room, and the newest waiting goes next (a scraper's handshake takes milliseconds)."""
        if len(self._handshaking) >= MAX_HANDSHAKES:
            self._handshake_queue[connection] = conn
            self._evict_stale()
            return
        self._handshaking[connection] = self.loop.time()
        task = self.loop.create_task(self._attach(conn, connection, context))
        task.add_done_callback(lambda _: self._handshake_done(connection, context))

    def _evict_stale(self) -> None:
        """While connections wait for a handshake, end the oldest once it is stale."""
        if not self._handshake_queue or len(self._handshaking) < MAX_HANDSHAKES:
            return
        room, now = len(self._handshake_queue), self.loop.time()
        for connection, started in list(self._handshaking.items()):  # oldest first
            if room == 0 or now < started + HANDSHAKE_STALE_SECONDS:
                break
            connection.abort()  # its handshake fails: _handshake_done starts a waiting one
            room -= 1
        if self._stale_timer is None:
            oldest = next(iter(self._handshaking.values()))
            when = max(oldest + HANDSHAKE_STALE_SECONDS, now + 0.05)
            self._stale_timer = self.loop.call_at(when, self._stale_timer_fired)

    def _stale_timer_fired(self) -> None:
        self._stale_timer = None
        self._evict_stale()

    def _handshake_done(self, connection: Connection, context: ssl.SSLContext) -> None:
        del self._handshaking[connection]
        if self._handshake_queue and not self._closed:
            waiting, conn = self._handshake_queue.popitem()  # the newest: see _handshake
            self._handshake(conn, waiting, self.ssl_context or context)

    async def _attach(
        self, conn: socket.socket, connection: Connection, context: ssl.SSLContext | None
    ) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: connection,
                conn,
                ssl=context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if context else None,
            )
        except (TimeoutError, OSError):  # a failed TLS handshake, a reset
            conn.close()
            connection.abort()

    # the connections' Host

    def waiting(self, connection: Connection, waits: bool) -> None:
        self.table.waiting(connection, waits)

    def forget(self, connection: Connection) -> None:
        waiting = self._handshake_queue.pop(connection, None)
        if waiting is not None:  # closed while it waited for a handshake turn
            waiting.close()
        if self.table.forget(connection) and not self.acceptor.accepting and not self._closed:
            self.acceptor.start()

    def refusal(self, request: Request, *, hung_up: bool) -> Response | None:
        if request.path in PUBLIC_PATHS:
            return None
        return self.gate.refusal(request, hung_up=hung_up)

    def answer(self, request: Request) -> tuple[Response, bool] | Check:
        if request.path not in PUBLIC_PATHS:
            admitted = self.gate.admit(request)
            if isinstance(admitted, Check):
                return admitted
            if admitted is not None:
                return admitted, False
        return self.route(request)

    def verify(self, check: Check, hung_up: Callable[[], bool]) -> asyncio.Future[bool]:
        return asyncio.ensure_future(self.gate.verify(check, hung_up))

    def route(self, request: Request) -> tuple[Response, bool]:
        if request.path == "/metrics" and request.method in ("GET", "HEAD"):
            if not self.table.start_metrics():
                return TOO_MANY_REQUESTS, False
            return RENDER, True
        if self.app.is_reload(request):
            return RELOAD, False
        return self.render(request), False

    async def produce(self, request: Request, response: Response) -> Response:
        if response is RENDER:  # /metrics: rendered in a worker thread, off this loop
            return await self.loop.run_in_executor(self.workers, self._build, request)
        if response is RELOAD:  # waits in the reload thread, holding no worker
            assert self.app.reloads is not None
            return self.app.reloaded(await asyncio.wrap_future(self.app.reloads.request()))
        return response

    def _build(self, request: Request) -> Response:
        """/metrics, one body at a time: building it is Python holding the GIL, and more
        builders at once only crowd the pollers' loop out of it (their sends still overlap)."""
        with self._building:
            return self.render(request)

    def render(self, request: Request) -> Response:
        """The app's answer (in a worker thread for /metrics)."""
        try:
            return self.app(request)
        except Exception:  # a bug: answer 500 rather than leave the client hanging
            log.exception("http_handler_failed", path=request.path)
            return text_response(500, "internal server error\n")

    async def offload(self, send: Callable[[], None]) -> None:
        await self.loop.run_in_executor(self.workers, send)

    def metrics_done(self) -> None:
        self.table.metrics_done()

    def _use_web_config(self, web: WebConfig) -> None:
        if web is not self._web:
            self._web = web
            self.ssl_context = web.ssl_context
            self.gate.use(web.basic_auth)
            self.extra_headers = list(web.headers.items())

    def close(self) -> None:
        self._closed = True
        self.acceptor.stop()
        self._sock.close()
        for connection in list(self.table.open):
            connection.abort()
        for conn in self._handshake_queue.values():
            conn.close()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.shutdown()

    def shutdown(self) -> None:
        """The threads: a bcrypt run in progress finishes (bounded by the cost cap), queued
        ones never start; workers' sends fail at once (their sockets were shut down)."""
        self.gate.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        if self.watcher is not None:
            self.watcher.close()
        self.app.close()


class MetricsServer:
    """The HTTP server on its own event loop in a background thread; `close()` stops it."""

    def __init__(
        self,
        app: ExporterApp,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        limits: ServerLimits | None = None,
        *,
        web_source: Callable[[], WebConfig] | None = None,
        on_stuck: Callable[[], None] | None = None,
        web_timeout: float = WEB_CONFIG_TIMEOUT_SECONDS,
    ) -> None:
        """`web_source` gives the web config to use now (looked at every few seconds, in a
        thread of its own); `on_stuck` is called when a look takes over `web_timeout` s."""
        self._sock = listen(host, port)
        self._loop = asyncio.new_event_loop()
        self._server = _Server(
            self._loop,
            self._sock,
            app,
            ssl_context if ssl_context is not None else app.web.ssl_context,
            limits or ServerLimits(),
            web_source=web_source,
            on_stuck=on_stuck,
            web_timeout=web_timeout,
        )
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def max_connections(self) -> int:
        """Connections served at once: the limit, or what the open-files limit leaves."""
        return self._server.table.max_connections

    def start(self) -> None:
        self._server.app.start(yield_to_the_pollers)
        self._thread.start()

    def _run(self) -> None:
        yield_to_the_pollers()
        asyncio.set_event_loop(self._loop)
        # Failed TLS handshakes and resets are the clients' business, not log lines.
        self._loop.set_exception_handler(
            lambda _loop, context: log.debug("http_connection_error", error=context.get("message"))
        )
        self._server.acceptor.start()
        if self._server.watcher is not None:
            self._server.watcher.start()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(asyncio.sleep(0))  # let cancelled tasks end
            self._loop.close()

    def close(self) -> None:
        if not self._thread.is_alive():
            self._server.shutdown()
            self._sock.close()
            return

        def stop() -> None:
            self._server.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(stop)
        self._thread.join(5)


def yield_to_the_pollers() -> None:
    """Lower the calling (HTTP) thread's scheduling priority (Linux: per-thread nice), so
    that on a busy machine the pollers' thread runs first when both are ready: a scrape
    may wait, a refresh should not."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HTTP_NICE)
