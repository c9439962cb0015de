"""The HTTP side: /metrics, /, /healthz and /readyz, in threads of their own.

Scrapes read the current snapshot and live counters; they never wait on the
poller or on Binance. TLS and basic auth come from a `--web.config.file`.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from exporter.collector import SnapshotCollector
from exporter.exposition import CachedExposition, Format
from exporter.snapshot import SnapshotStore
from exporter.webconfig import WebConfig

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = structlog.get_logger("exporter.server")

Response = tuple[str, list[tuple[str, str]], list[bytes]]
#: how often the accept loop checks for shutdown (close() waits up to this long)
SHUTDOWN_POLL_SECONDS = 0.05
#: a client that sends nothing for this long is dropped
CLIENT_TIMEOUT_SECONDS = 30.0

LANDING_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>Binance PM Exporter</title></head>
<body><h1>Binance Portfolio Margin Exporter</h1>
<ul><li><a href="metrics">/metrics</a></li><li><a href="readyz">/readyz</a></li>
<li><a href="healthz">/healthz</a></li></ul></body></html>
"""


class ExporterApp:
    """A WSGI application serving the exporter's endpoints.

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
    ) -> None:
        self._registry = registry
        self._store = store
        self._web = web or WebConfig()
        self._exposition = exposition
        self._routes: dict[str, Callable[[WSGIEnvironment], Response]] = {
            "/metrics": self._metrics,
            "/": self._landing,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        route = self._routes.get(path)
        if route is None:
            status, headers, body = "404 Not Found", _text(), [b"not found\n"]
        elif method not in ("GET", "HEAD"):
            status, headers, body = (
                "405 Method Not Allowed",
                [*_text(), ("Allow", "GET, HEAD")],
                [b"method not allowed\n"],
            )
        elif path != "/healthz" and not self._web.authorized(environ.get("HTTP_AUTHORIZATION")):
            status, headers, body = (
                "401 Unauthorized",
                [
                    *_text(),
                    ("WWW-Authenticate", 'Basic realm="binance-pm-exporter"'),
                ],
                [b"unauthorized\n"],
            )
        else:
            status, headers, body = route(environ)
        length = sum(len(chunk) for chunk in body)
        headers += [*self._web.headers.items(), ("Content-Length", str(length))]
        start_response(status, headers)
        return [b""] if method == "HEAD" else body

    def _metrics(self, environ: WSGIEnvironment) -> Response:
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        gzipped = "gzip" in environ.get("HTTP_ACCEPT_ENCODING", "")
        headers = [("Content-Type", content_type)]
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Vary", "Accept, Accept-Encoding"))
        fmt = _cacheable_format(encoder)
        if self._exposition is None or fmt is None:
            # No cache, or a name escaping that renames: render everything now.
            everything: Collector = self._registry
            if self._exposition is not None:
                everything = _Chain(SnapshotCollector(self._store), self._registry)
            body = encoder(everything)
            return "200 OK", headers, [gzip.compress(body, compresslevel=6) if gzipped else body]
        live = encoder(self._registry)  # the live self-metrics (and `# EOF`), per scrape
        if gzipped:
            return "200 OK", headers, self._exposition.gzip(fmt).finish(live)
        return "200 OK", headers, [self._exposition.text(fmt), live]

    def _landing(self, environ: WSGIEnvironment) -> Response:
        return "200 OK", [("Content-Type", "text/html; charset=utf-8")], [LANDING_PAGE]

    def _healthz(self, environ: WSGIEnvironment) -> Response:
        return "200 OK", _text(), [b"ok\n"]

    def _readyz(self, environ: WSGIEnvironment) -> Response:
        pending = self._store.current.pending
        status = "503 Service Unavailable" if pending else "200 OK"
        body = {"status": "pending", "pending": pending} if pending else {"status": "ready"}
        return status, [("Content-Type", "application/json")], [json.dumps(body).encode() + b"\n"]


class _Chain(Collector):
    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def _cacheable_format(encoder: Callable[..., bytes]) -> Format | None:
    """The cached format that equals what `encoder` (from choose_encoder) writes, if any.

    Our names are valid legacy names, which the `underscores` and `allow-utf-8`
    escapings leave alone (Prometheus asks for one of them); prometheus_client
    renames samples under the others, so those are rendered in full.
    """
    func = getattr(encoder, "func", encoder)
    keywords: dict[str, object] = getattr(encoder, "keywords", {})
    if keywords.get("escaping", openmetrics.UNDERSCORES) not in _NAMES_KEPT:
        return None
    if func is openmetrics.generate_latest:
        return "openmetrics"
    if func is generate_latest:
        return "text"
    return None


_NAMES_KEPT = frozenset({openmetrics.UNDERSCORES, openmetrics.ALLOWUTF8})


def _text() -> list[tuple[str, str]]:
    return [("Content-Type", "text/plain; charset=utf-8")]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Access logs would drown the poller's events; scrapes are not logged."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 drops connections under concurrent scrapers,
    # and a dropped SYN is retried after 1, 3, 7, 15 s: tail latencies of many seconds.
    request_queue_size = socket.SOMAXCONN

    def __init__(
        self, host: str, port: int, app: WSGIApplication, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.address_family = _family(host)
        self.ssl_context = ssl_context
        super().__init__((host, port), _QuietHandler)
        self.set_app(app)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CLIENT_TIMEOUT_SECONDS)
        if self.ssl_context is not None:
            # The handshake happens here, in the request's thread, not in accept().
            request = self.ssl_context.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http_client_error", client=str(client_address[0]))


class MetricsServer:
    """The threaded HTTP server in a background thread; `close()` stops it."""

    def __init__(
        self,
        app: WSGIApplication,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._server = _ThreadingServer(host, port, app, ssl_context)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="http",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _family(host: str) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


def parse_listen_address(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[V6]:PORT` as (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - listening everywhere is the default
