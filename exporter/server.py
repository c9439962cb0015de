"""The HTTP side: /metrics, /, /healthz and /readyz, on an event loop in a thread of its own.

Scrapes read the current snapshot and live counters; they never wait on the
poller or on Binance. TLS and basic auth come from a `--web.config.file`.

The server is asyncio with h11 (the HTTP/1.1 parser httpx already uses) rather
than the standard library's thread-per-connection WSGI server, which a hostile
peer could take down (issue 10): 1,100 half-sent connections took every file
descriptor and spun its accept loop; closing 2,000 half-sent requests made it
render a full 200 for each and starved the poller. Here every connection is a
few hundred bytes of state on one loop, and the limits are explicit
(`ServerLimits`):

- at most `max_connections` (never more than the open-files limit allows); past
  it, the connection that has waited longest for its request is dropped, so a
  crowd of idle or half-sent connections cannot lock a scraper out;
- the request line and headers must arrive within `read_header_timeout` in total
  (also the keep-alive idle limit; a TLS handshake counts too), and within
  `max_header_bytes` (431 past it); a request not ended by its blank line is
  never served;
- at most `max_requests` /metrics requests in flight (503 beyond, as
  node_exporter's --web.max-requests);
- bcrypt runs in one worker thread with a short queue (429 beyond it), and a
  check whose client hung up while it waited is skipped;
- accept() failing for want of descriptors pauses accepting for a moment rather
  than spinning.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import gzip
import json
import math
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import h11
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from exporter.collector import SnapshotCollector
from exporter.exposition import CachedExposition, Format
from exporter.snapshot import SnapshotStore
from exporter.webconfig import WEB_CONFIG_CHECK_SECONDS, Pending, WebConfig

log = structlog.get_logger("exporter.server")

#: paths answered without credentials: probes (neither says more than ready or not)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
#: bcrypt checks that may wait for the one bcrypt thread; more are answered 429 at once
AUTH_QUEUE = 4
#: descriptors kept free of connections: the poller's sockets, files, the accept batch
RESERVED_FILES = 128
#: connections accepted per turn of the loop: under a flood of new connections, those
#: already open (a scraper's kept-alive one) are served between small batches
ACCEPT_BATCH = 8
#: connections the kernel holds until accepted. socketserver's 5 dropped connections under
#: concurrent scrapers (a dropped SYN is retried after 1, 3, 7, 15 s); 4096 let a flood
#: queue ~1.5 s of work that went on after it stopped.
LISTEN_BACKLOG = 1024
#: how long accepting pauses when accept() finds no descriptor free
ACCEPT_RETRY_SECONDS = 0.1
#: how long a kept-alive connection may wait for its next request (Prometheus keeps its
#: connection between scrapes, commonly 15-60 s apart)
IDLE_SECONDS = 120.0
#: threads rendering and sending /metrics at once: enough to use every core for the
#: kernel's copying; more only crowd out the pollers' thread (bench/load.py, wrk -c64)
WORKERS = 4
#: how much nicer the HTTP threads are than the pollers' (0-19)
HTTP_NICE = 10
#: a client that reads nothing of its answer for this long is dropped
SEND_TIMEOUT_SECONDS = 30.0
#: bodies are handed to the socket in pieces of this size, waiting while its buffer is full
WRITE_CHUNK = 256 * 1024

LANDING_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>Binance PM Exporter</title></head>
<body><h1>Binance Portfolio Margin Exporter</h1>
<ul><li><a href="metrics">/metrics</a></li><li><a href="readyz">/readyz</a></li>
<li><a href="healthz">/healthz</a></li></ul></body></html>
"""

REASONS = {
    200: "OK",
    400: "Bad Request",
    500: "Internal Server Error",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class ServerLimits:
    """What one peer, or many, may cost the server. Flags: see cli.py and README (Security)."""

    #: connections open at once (also capped by the open-files limit)
    max_connections: int = 1000
    #: /metrics requests in flight; more get 503 (node_exporter's --web.max-requests)
    max_requests: int = 40
    #: seconds for the request line and headers, in total (and for a keep-alive idle wait)
    read_header_timeout: float = 10.0
    #: bytes of request line and headers; more get 431
    max_header_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    #: header names lower-case; repeated headers joined with ", "
    headers: dict[str, str]


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: list[bytes]


def text_response(status: int, text: str, *headers: tuple[str, str]) -> Response:
    """A plain-text response (every error is one)."""
    return Response(
        status, [("Content-Type", "text/plain; charset=utf-8"), *headers], [text.encode()]
    )


class ExporterApp:
    """The exporter's endpoints: a request in, a response out (auth is the server's).

    With `exposition`, /metrics is the snapshot's cached exposition followed by
    `registry` (the live self-metrics) rendered per scrape; without it, the whole
    `registry` is rendered per scrape.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        store: SnapshotStore,
        web: WebConfig | None = None,
        *,
        exposition: CachedExposition | None = None,
        reload: Callable[[], str | None] | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self.web = web or WebConfig()
        self._exposition = exposition
        self._reload = reload
        #: path -> (its methods, its handler)
        self._routes: dict[str, tuple[tuple[str, ...], Callable[[Request], Response]]] = {
            "/metrics": (READ, self._metrics),
            "/": (READ, self._landing),
            "/healthz": (READ, self._healthz),
            "/readyz": (READ, self._readyz),
        }
        if reload is not None:  # --web.enable-lifecycle, as Prometheus's
            self._routes[RELOAD_PATH] = (("POST", "PUT"), self._reload_config)

    def __call__(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        if route is None:
            return text_response(404, "not found\n")
        methods, handler = route
        if request.method not in methods:
            allow = ("Allow", ", ".join(methods))
            return text_response(405, "method not allowed\n", allow)
        return handler(request)

    def _reload_config(self, request: Request) -> Response:
        # A worker thread: the reload runs on the pollers' loop, this waits for its verdict.
        assert self._reload is not None
        try:
            problem = self._reload()
        except TimeoutError:
            problem = "the reload did not finish in time"
        if problem is None:
            return text_response(200, "config reloaded\n")
        return text_response(500, f"failed to reload config: {problem}\n")

    def _metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        gzipped = gzip_accepted(request.headers.get("accept-encoding", ""))
        headers = [("Content-Type", content_type)]
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Vary", "Accept, Accept-Encoding"))
        fmt = cacheable_format(content_type)
        if self._exposition is None or fmt is None:
            # No cache, or a name escaping that renames: render everything now.
            everything: Collector = self._registry
            if self._exposition is not None:
                snapshot = SnapshotCollector(self._store, self._exposition.families)
                everything = _Chain(snapshot, self._registry)
            body = encoder(everything)
            return Response(200, headers, [gzip.compress(body, 6) if gzipped else body])
        live = encoder(self._registry)  # the live self-metrics (and `# EOF`), per scrape
        if gzipped:
            return Response(200, headers, self._exposition.gzip(fmt).finish(live))
        return Response(200, headers, [self._exposition.text(fmt), live])

    def _landing(self, request: Request) -> Response:
        return Response(200, [("Content-Type", "text/html; charset=utf-8")], [LANDING_PAGE])

    def _healthz(self, request: Request) -> Response:
        return text_response(200, "ok\n")

    def _readyz(self, request: Request) -> Response:
        # Outside basic auth, for readiness probes: a count, not the accounts' names.
        pending = len(self._store.current.pending)
        status = 503 if pending else 200
        body = {"status": "pending", "pending": pending} if pending else {"status": "ready"}
        return Response(
            status, [("Content-Type", "application/json")], [json.dumps(body).encode() + b"\n"]
        )


class _Chain(Collector):
    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def cacheable_format(content_type: str) -> Format | None:
    """The cached format that equals what choose_encoder's `content_type` promises, if any.

    Our names are valid legacy names, which the `underscores` and `allow-utf-8`
    escapings leave alone (Prometheus asks for one of them; no escaping parameter
    means the classic text format, which keeps them too); prometheus_client renames
    samples under the others, so those are rendered in full.
    """
    media_type, *params = (part.strip() for part in content_type.split(";"))
    escaping = openmetrics.UNDERSCORES
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "escaping":
            escaping = value.strip()
    if escaping not in _NAMES_KEPT:
        return None
    if media_type == "application/openmetrics-text":
        return "openmetrics"
    if media_type == "text/plain":
        return "text"
    return None


_NAMES_KEPT = frozenset({openmetrics.UNDERSCORES, openmetrics.ALLOWUTF8})


def gzip_accepted(accept_encoding: str) -> bool:
    """Whether gzip is the best coding `Accept-Encoding` allows (RFC 9110, 12.5.3).

    Codings are case-insensitive tokens, each with an optional `q` weight (0 means
    "not acceptable"); `*` stands for every coding not named; identity is
    acceptable unless excluded. gzip wins ties with identity, as Go's promhttp does.
    """
    weights: dict[str, float] = {}
    for element in accept_encoding.split(","):
        coding, *params = (part.strip() for part in element.split(";"))
        if not coding:
            continue
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                weight = _qvalue(value.strip())
        weights[coding.lower()] = weight
    wildcard = weights.get("*")
    gzip_weight = weights.get("gzip", weights.get("x-gzip", wildcard or 0.0))
    identity_weight = weights.get("identity", 1.0 if wildcard is None else wildcard)
    return gzip_weight > 0 and gzip_weight >= identity_weight


def _qvalue(text: str) -> float:
    """A q-value ("0" to "1", at most three decimals); anything else counts as 0."""
    try:
        value = float(text)
    except ValueError:
        return 0.0
    if not math.isfinite(value) or not 0 <= value <= 1 or len(text) > 5:
        return 0.0
    return value


# --- the server ----------------------------------------------------------------------------


DENIED = text_response(
    401, "unauthorized\n", ("WWW-Authenticate", 'Basic realm="binance-pm-exporter"')
)
TOO_MANY_CHECKS = text_response(429, "too many authentication attempts\n", ("Retry-After", "1"))
#: `_Server.route`'s answer for /metrics: rendered by `_Server.render` in a worker thread
RENDER = Response(200, [], [])
READ = ("GET", "HEAD")
#: where `--web.enable-lifecycle` serves the config reload (Prometheus's path)
RELOAD_PATH = "/-/reload"
TOO_MANY_REQUESTS = text_response(503, "too many requests in flight\n", ("Retry-After", "1"))


def _header_bytes(event: h11.Request) -> int:
    """The size of the request line and headers as sent (give or take whitespace)."""
    size = len(event.method) + len(event.target) + len("  HTTP/1.1\r\n\r\n")
    return size + sum(len(name) + len(value) + 4 for name, value in event.headers)


def _request(event: h11.Request) -> Request:
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("ascii", "replace")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("latin-1")
    return Request(event.method.decode("ascii", "replace"), target.split("?")[0], headers)


def _send_blocking(sock: socket.socket, chunks: list[bytes]) -> None:
    """Send `chunks` on a duplicate of `sock` (its own timeout; the loop's socket stays
    non-blocking), from a worker thread."""
    with socket.socket(fileno=os.dup(sock.fileno())) as dup:
        dup.settimeout(SEND_TIMEOUT_SECONDS)
        for chunk in chunks:
            dup.sendall(chunk)


def _raw_response(
    request: Request | None, response: Response, extra: list[tuple[str, str]]
) -> bytes:
    """`response` as bytes, with `Connection: close` (the connection closes after it)."""
    body = b"".join(response.body)
    lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}"]
    lines += [f"{name}: {value}" for name, value in (*response.headers, *extra)]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    head = "\r\n".join(lines).encode("latin-1")
    return head if request is not None and request.method == "HEAD" else head + body


class _Connection(asyncio.Protocol):
    """One client connection: h11 parses, the app answers, the server counts."""

    def __init__(self, server: _Server, sock: socket.socket) -> None:
        self._server = server
        self._sock = sock
        self._h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.limits.max_header_bytes
        )
        self.transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        #: set while the socket's buffer is full; resume_writing() resolves it
        self._drained: asyncio.Future[None] | None = None
        #: a request parsed before the transport existed (see `_Server.try_at_once`)
        self._first: h11.Request | None = None
        #: waiting between requests: the first byte of the next one restarts the deadline
        self._idle = False
        #: the peer half-closed or hung up: a bcrypt check for it is not worth doing
        self.hung_up = False
        #: the connection is closed: nothing more can be written
        self.lost = False
        #: the request being answered came with a body (which is not read)
        self._has_body = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._first is not None:
            first, self._first = self._first, None
            self._start(first)

    def try_at_once(self, sock: socket.socket) -> bool:
        """Read what a fresh plain-HTTP connection has sent already and, when it is a
        request refused at once (401, 429, 400, 431), answer it on the raw socket and
        close it: no transport, no task. A flood of such requests then costs about a
        tenth of a millisecond each. False: the connection needs a transport."""
        try:
            data = sock.recv(self._server.limits.max_header_bytes + 1)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:  # connected and hung up at once (or reset)
            sock.close()
            return True
        self._h11.receive_data(data)
        try:
            more = sock.recv(self._server.limits.max_header_bytes + 1)
        except BlockingIOError:
            more = None
        except OSError:
            more = b""
        if more:
            self._h11.receive_data(more)
        hung_up = more == b""  # sent its request and hung up: no bcrypt run for it
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            refusal = text_response(431 if exc.error_status_hint == 431 else 400, "")
            refusal.body = [f"{REASONS[refusal.status].lower()}\n".encode()]
            request = None
        else:
            if not isinstance(event, h11.Request):
                return False  # NEED_DATA: the transport will receive the rest
            request = _request(event)
            if _header_bytes(event) > self._server.limits.max_header_bytes:
                self._first = event  # refused by _start, with the connection's bookkeeping
                return False
            quick = self._server.refusal(request, hung_up=hung_up)
            if quick is None:
                self._first = event  # answered once the transport is there
                return False
            refusal = quick
        if not hung_up:
            with contextlib.suppress(OSError):  # it may have gone since: fine
                sock.send(_raw_response(request, refusal, self._server.extra_headers))
        sock.close()
        return True

    def data_received(self, data: bytes) -> None:
        if self._idle and self._deadline is not None:
            self._deadline.cancel()
            self._wait_for_request()  # the idle wait is over: the header deadline starts
        self._h11.receive_data(data)
        if self._task is None:
            self._next_request()
        elif len(self._h11.trailing_data[0]) > self._server.limits.max_header_bytes:
            self.close()  # pipelining more than a request's worth while one is answered

    def eof_received(self) -> bool:
        self.hung_up = True  # as in Go's net/http, a half-close cancels the request's auth wait
        if self._task is None:
            self.close()
            return False
        return True  # keep the transport open to write the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.hung_up = self.lost = True
        self.resume_writing()
        if self._deadline is not None:
            self._deadline.cancel()
        self._server.forget(self)

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = self._server.loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None

    # the request cycle

    def start_clock(self) -> None:
        self._wait_for_request()

    def _wait_for_request(self, idle: bool = False) -> None:
        """Start the clock for the next request: `read_header_timeout` for its request line
        and headers, or, between requests on a kept-alive connection (`idle`), IDLE_SECONDS
        for its first byte (then `read_header_timeout` again)."""
        self._server.waiting(self, True)
        self._idle = idle
        seconds = IDLE_SECONDS if idle else self._server.limits.read_header_timeout
        self._deadline = self._server.loop.call_later(seconds, self.close)

    def _next_request(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            self._refuse(431 if status == 431 else 400)
            return
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return
        if not isinstance(event, h11.Request):
            self.close()  # ConnectionClosed, or a body we do not read
            return
        self._start(event)

    def _start(self, event: h11.Request) -> None:
        if _header_bytes(event) > self._server.limits.max_header_bytes:
            self._refuse(431)  # arrived whole: h11 caps only what is still incomplete
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._server.waiting(self, False)
        try:
            self._has_body = not isinstance(self._h11.next_event(), h11.EndOfMessage)
        except h11.RemoteProtocolError:
            self._has_body = True
        request = _request(event)
        outcome = self._server.answer(request)
        if isinstance(outcome, Pending):
            self._task = self._server.loop.create_task(self._answer_after_bcrypt(request, outcome))
        else:
            self._reply(request, *outcome)

    async def _answer_after_bcrypt(self, request: Request, pending: Pending) -> None:
        try:
            authorized = await self._server.verify(pending, self)
        finally:
            self._task = None
        if self.hung_up:
            self.abort()  # nobody is listening for the answer
            return
        self._reply(request, *(self._server.route(request) if authorized else (DENIED, False)))

    def _reply(self, request: Request, response: Response, metrics: bool) -> None:
        """Errors are written at once and close the connection (a flood of them must cost
        little); other answers go out through h11, paced by the socket, and keep it alive."""
        if response.status < 400:
            self._task = self._server.loop.create_task(self._answer(request, response, metrics))
            return
        assert self.transport is not None
        self.transport.write(_raw_response(request, response, self._server.extra_headers))
        self.close()

    async def _answer(self, request: Request, response: Response, metrics: bool) -> None:
        try:
            if response is RENDER:  # /metrics: rendered in a worker thread, off this loop
                response = await self._server.loop.run_in_executor(
                    self._server.workers, self._server.render, request
                )
            keep_alive = not self.lost and await self._send(request, response)
        except (OSError, h11.LocalProtocolError):
            keep_alive = False
        finally:
            self._task = None
            if metrics:
                self._server.metrics_done()
        if not keep_alive or self.hung_up:
            self.close()
            return
        self._h11.start_next_cycle()
        self._wait_for_request(idle=True)
        self._next_request()  # a pipelined request may be buffered already

    async def _send(self, request: Request, response: Response) -> bool:
        """Write `response`; whether the connection may serve another request."""
        assert self.transport is not None
        length = sum(len(chunk) for chunk in response.body)
        extra = self._server.extra_headers
        keep_alive = not self._has_body and not self.hung_up
        head = [*response.headers, *extra, ("Content-Length", str(length))]
        if not keep_alive:
            head.append(("Connection", "close"))
        reason = REASONS.get(response.status, "").encode()
        status_line = self._h11.send(
            h11.Response(status_code=response.status, headers=head, reason=reason)
        )
        if (
            length > WRITE_CHUNK
            and request.method != "HEAD"
            and self._server.ssl_context is None
            and self.transport.get_write_buffer_size() == 0
        ):
            # A large body goes out from a worker thread with a blocking send, as the
            # threaded server did: on loopback the kernel does the receiver's work inside
            # send(), which then runs on both cores, and this loop stays free meanwhile.
            chunks = [status_line or b""]
            for chunk in response.body:
                chunks += self._h11.send_with_data_passthrough(h11.Data(data=chunk)) or ()
            chunks.append(self._h11.send(h11.EndOfMessage()) or b"")
            await self._server.loop.run_in_executor(
                self._server.workers, _send_blocking, self._sock, chunks
            )
            return (
                keep_alive and self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE
            )
        self.transport.write(status_line or b"")
        if request.method != "HEAD":
            for chunk in response.body:
                view = memoryview(chunk)
                for start in range(0, len(view), WRITE_CHUNK):
                    if self._drained is not None:
                        await self._drained
                    if self.lost:
                        return False
                    for data in (
                        self._h11.send_with_data_passthrough(
                            h11.Data(data=view[start : start + WRITE_CHUNK])  # type: ignore[arg-type]
                        )
                        or ()
                    ):
                        self.transport.write(data)
        self.transport.write(self._h11.send(h11.EndOfMessage()) or b"")
        return keep_alive and self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    def _refuse(self, status: int) -> None:
        """Answer a request h11 could not take (headers too large, malformed) and close."""
        assert self.transport is not None
        response = text_response(status, f"{REASONS[status].lower()}\n")
        self.transport.write(_raw_response(None, response, self._server.extra_headers))
        self.close()

    def close(self) -> None:
        if self.transport is None:
            self._end_handshake()
        elif not self.transport.is_closing():
            self.transport.close()
            # close() waits for the write buffer; a peer that never reads would hold it.
            self._server.loop.call_later(1.0, self.transport.abort)
        self._server.forget(self)

    def abort(self) -> None:
        self._end_handshake()
        if self.transport is not None:
            self.transport.abort()
        self._server.forget(self)

    def _end_handshake(self) -> None:
        """Fail a TLS handshake in progress, or a worker's send: the transport then closes
        the socket itself."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


class _Server:
    """The connections of one listening socket, on the loop of the HTTP thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        app: ExporterApp,
        ssl_context: ssl.SSLContext | None,
        limits: ServerLimits,
        *,
        web_source: Callable[[], WebConfig] | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.app = app
        self.ssl_context = ssl_context
        self.limits = limits
        self.extra_headers = list(app.web.headers.items())
        #: the web config to use now (a re-read `--web.config.file`); None: it never changes
        self._web_source = web_source
        self.max_connections = min(limits.max_connections, _free_files())
        self._connections: set[_Connection] = set()
        #: connections waiting for their request, oldest first (a dict keeps order)
        self._waiting: dict[_Connection, None] = {}
        self._in_flight = 0
        self._accepting = False
        self._closed = False
        self._auth_lock = asyncio.Lock()
        self._auth_queued = 0
        self.bcrypt = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="bcrypt", initializer=yield_to_the_pollers
        )
        #: /metrics renders and large writes; more in flight wait their turn
        self.workers = concurrent.futures.ThreadPoolExecutor(
            min(limits.max_requests, WORKERS),
            thread_name_prefix="http-worker",
            initializer=yield_to_the_pollers,
        )

    def watch_web_config(self) -> None:
        """Look at the web config's files every few seconds (in a worker thread: a changed
        one is loaded, certificates included); new connections use what it gives."""
        if self._web_source is None or self._closed:
            return
        future = self.loop.run_in_executor(self.workers, self._web_source)
        future.add_done_callback(self._use_web_config)

    def _use_web_config(self, future: asyncio.Future[WebConfig]) -> None:
        if not future.cancelled() and future.exception() is None:
            web = future.result()
            if web is not self.app.web:
                self.app.web = web
                self.ssl_context = web.ssl_context
                self.extra_headers = list(web.headers.items())
        if not self._closed:
            self.loop.call_later(WEB_CONFIG_CHECK_SECONDS, self.watch_web_config)

    def start_accepting(self) -> None:
        if not self._accepting:
            self._accepting = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def stop_accepting(self) -> None:
        if self._accepting:
            self._accepting = False
            self.loop.remove_reader(self.sock.fileno())

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self._connections) >= self.max_connections and not self._evict():
                self.stop_accepting()  # every connection is busy: resume when one ends
                return
            try:
                conn, _address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("http_accept_paused", reason=errno.errorcode[exc.errno])
                    self.stop_accepting()
                    self.loop.call_later(ACCEPT_RETRY_SECONDS, self.start_accepting)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            conn.setblocking(False)
            protocol = _Connection(self, conn)
            if self.ssl_context is None and protocol.try_at_once(conn):
                continue
            self._connections.add(protocol)
            protocol.start_clock()  # a TLS handshake counts toward the header deadline
            self.loop.create_task(self._attach(conn, protocol))

    async def _attach(self, conn: socket.socket, protocol: _Connection) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self.ssl_context,
                ssl_handshake_timeout=self.limits.read_header_timeout if self.ssl_context else None,
            )
        except OSError:  # a failed TLS handshake, a reset
            conn.close()
            protocol.abort()

    def _evict(self) -> bool:
        """Drop the connection that has waited longest for its request; False if none waits."""
        for oldest in self._waiting:
            oldest.abort()
            return True
        return False

    def waiting(self, connection: _Connection, waits: bool) -> None:
        if waits:
            self._waiting[connection] = None
        else:
            self._waiting.pop(connection, None)

    def forget(self, connection: _Connection) -> None:
        self._waiting.pop(connection, None)
        if connection in self._connections:
            self._connections.discard(connection)
            if not self._accepting and not self._closed:
                self.start_accepting()

    def refusal(self, request: Request, *, hung_up: bool) -> Response | None:
        """The error `answer()` would give at once, without side effects; None if none.
        A client that `hung_up` is refused what would need bcrypt."""
        basic_auth = self.app.web.basic_auth
        if basic_auth is None or request.path in PUBLIC_PATHS:
            return None
        verdict = basic_auth.verdict(request.headers.get("authorization"))
        if isinstance(verdict, Pending):
            if hung_up:
                return DENIED
            return TOO_MANY_CHECKS if self._auth_queued >= AUTH_QUEUE else None
        return None if verdict else DENIED

    def answer(self, request: Request) -> tuple[Response, bool] | Pending:
        """The answer to `request` and whether it holds a /metrics slot (release it with
        `metrics_done()`), or the bcrypt check to `verify()` first."""
        basic_auth = self.app.web.basic_auth
        if basic_auth is not None and request.path not in PUBLIC_PATHS:
            verdict = basic_auth.verdict(request.headers.get("authorization"))
            if isinstance(verdict, Pending):
                if self._auth_queued >= AUTH_QUEUE:
                    return TOO_MANY_CHECKS, False
                self._auth_queued += 1  # until verify() ends
                return verdict
            if not verdict:
                return DENIED, False
        return self.route(request)

    def route(self, request: Request) -> tuple[Response, bool]:
        """The answer of an authorized request, as for `answer()`."""
        metrics = request.path == "/metrics" and request.method in ("GET", "HEAD")
        if metrics:
            if self._in_flight >= self.limits.max_requests:
                return TOO_MANY_REQUESTS, False
            self._in_flight += 1
            return RENDER, True
        if request.path == RELOAD_PATH:  # waits for the reload: not on this loop
            return RENDER, False
        return self.render(request), False

    def render(self, request: Request) -> Response:
        """The app's answer (in a worker thread for /metrics)."""
        try:
            return self.app(request)
        except Exception:  # a bug: answer 500 rather than leave the client hanging
            log.exception("http_handler_failed", path=request.path)
            return text_response(500, "internal server error\n")

    def metrics_done(self) -> None:
        self._in_flight -= 1

    async def verify(self, pending: Pending, connection: _Connection) -> bool:
        """Run the bcrypt check `answer()` asked for, one at a time, unless its client left."""
        try:
            async with self._auth_lock:  # one check at a time: a flood costs one core at most
                await asyncio.sleep(0)  # read what has arrived: the client may have hung up
                if connection.hung_up:
                    return False  # the client hung up while it waited: check nothing
                basic_auth = self.app.web.basic_auth  # the web config's now: it may reload
                if basic_auth is None:
                    return True  # a reloaded web config has no auth any more
                return await self.loop.run_in_executor(self.bcrypt, basic_auth.verify, pending)
        finally:
            self._auth_queued -= 1

    def close(self) -> None:
        self._closed = True
        self.stop_accepting()
        self.sock.close()
        for connection in list(self._connections):
            connection.abort()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        # A bcrypt run in progress finishes (bounded by the cost cap); queued ones never start.
        # Workers' sends fail at once: abort() shut their sockets down.
        self.bcrypt.shutdown(wait=False, cancel_futures=True)
        self.workers.shutdown(wait=False, cancel_futures=True)


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
    ) -> None:
        self._sock = listen(host, port)
        self._loop = asyncio.new_event_loop()
        self._server = _Server(
            self._loop,
            self._sock,
            app,
            ssl_context,
            limits or ServerLimits(),
            web_source=web_source,
        )
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def max_connections(self) -> int:
        """Connections served at once: the limit, or what the open-files limit leaves."""
        return self._server.max_connections

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        yield_to_the_pollers()
        asyncio.set_event_loop(self._loop)
        # Failed TLS handshakes and resets are the clients' business, not log lines.
        self._loop.set_exception_handler(
            lambda _loop, context: log.debug("http_connection_error", error=context.get("message"))
        )
        self._server.start_accepting()
        self._loop.call_later(WEB_CONFIG_CHECK_SECONDS, self._server.watch_web_config)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(asyncio.sleep(0))  # let cancelled tasks end
            self._loop.close()

    def close(self) -> None:
        if not self._thread.is_alive():
            self._server.bcrypt.shutdown(wait=False, cancel_futures=True)
            self._server.workers.shutdown(wait=False, cancel_futures=True)
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


def _free_files() -> int:
    """Connections the open-files limit leaves room for, after RESERVED_FILES."""
    try:
        import resource  # noqa: PLC0415 - POSIX only

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError):
        return 1 << 30
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(16, soft - RESERVED_FILES)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket: `host` "" is every address, IPv6 and IPv4 (IPv4 alone where the
    machine has no IPv6); "0.0.0.0" is IPv4 only, "::" IPv6 only; else the host's address."""
    if host == "":
        try:
            return _bind(socket.AF_INET6, ("::", port), v6only=False)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise
            return _bind(socket.AF_INET, ("0.0.0.0", port))  # noqa: S104 - listening everywhere
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return _bind(family, address, v6only=True)


def _bind(family: int, address: Any, *, v6only: bool = True) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(address)
        sock.listen(min(LISTEN_BACKLOG, socket.SOMAXCONN))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def parse_listen_address(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` (every address, "") or `[V6]:PORT` as (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
