"""The exporter's endpoints: /metrics with its content negotiation, /, the probes, and
`/-/reload`; a request in, a response out (auth is the gate's, sockets the protocol's).

/metrics is the snapshot's cached exposition, kept built ahead of scrapes by a
thread of its own once started, followed by the live self-metrics rendered per
scrape (without a cache, the whole registry per scrape). A reload
runs in a thread of its own; requests that arrive while one runs share its verdict.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import math
import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from exporter import livetext
from exporter.collector import SnapshotCollector
from exporter.exposition import CachedExposition, Format, Prerenderer
from exporter.http.messages import Request, Response, text_response
from exporter.http.site import WebConfig
from exporter.snapshot import SnapshotStore

#: paths answered without credentials: probes (neither says more than ready or not)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
READ = ("GET", "HEAD")
#: where `--web.enable-lifecycle` serves the config reload (Prometheus's path)
RELOAD_PATH = "/-/reload"

LANDING_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>Binance PM Exporter</title></head>
<body><h1>Binance Portfolio Margin Exporter</h1>
<ul><li><a href="metrics">/metrics</a></li><li><a href="readyz">/readyz</a></li>
<li><a href="healthz">/healthz</a></li></ul></body></html>
"""


class Reloads:
    """Runs `reload` in one thread of its own; a request made while a run is under way
    shares that run and its verdict (None: reloaded, else the problem)."""

    def __init__(self, reload: Callable[[], str | None]) -> None:
        self._reload = reload
        self._lock = threading.Lock()
        self._running: concurrent.futures.Future[str | None] | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reload")

    def request(self) -> concurrent.futures.Future[str | None]:
        with self._lock:
            if self._running is None or self._running.done():
                self._running = self._thread.submit(self._run)
            return self._running

    def _run(self) -> str | None:
        try:
            return self._reload()
        except TimeoutError:
            return "the reload did not finish in time"

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


class ExporterApp:
    """The exporter's endpoints. `web` is the web config the server starts with."""

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
        self._prerender: Prerenderer | None = None
        #: the config reloads (--web.enable-lifecycle, as Prometheus's); None: off
        self.reloads = Reloads(reload) if reload is not None else None
        #: path -> (its methods, its handler)
        self._routes: dict[str, tuple[tuple[str, ...], Callable[[Request], Response]]] = {
            "/metrics": (READ, self._metrics),
            "/": (READ, self._landing),
            "/healthz": (READ, self._healthz),
            "/readyz": (READ, self._readyz),
        }

    def start(self, on_start: Callable[[], None]) -> None:
        """Keep /metrics bodies built ahead of scrapes (a thread calling `on_start` first)."""
        if self._exposition is not None and self._prerender is None:
            self._prerender = Prerenderer(self._exposition, self._store, on_start=on_start)
            self._prerender.start()

    def close(self) -> None:
        if self._prerender is not None:
            self._prerender.close()
        if self.reloads is not None:
            self.reloads.close()

    def __call__(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        if route is None:
            if request.path == RELOAD_PATH and self.reloads is not None:
                return text_response(405, "method not allowed\n", ("Allow", "POST, PUT"))
            return text_response(404, "not found\n")
        methods, handler = route
        if request.method not in methods:
            allow = ("Allow", ", ".join(methods))
            return text_response(405, "method not allowed\n", allow)
        return handler(request)

    def is_reload(self, request: Request) -> bool:
        """A request to run a reload (answered with `reloaded()` once it has run)."""
        return (
            self.reloads is not None
            and request.path == RELOAD_PATH
            and request.method in ("POST", "PUT")
        )

    @staticmethod
    def reloaded(problem: str | None) -> Response:
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
        # the live self-metrics (and `# EOF`), per scrape
        live = livetext.render(self._registry.collect(), fmt) or encoder(self._registry)
        if gzipped:
            return Response(200, headers, self._exposition.gzip(fmt).finish(live))
        return Response(200, headers, [*self._exposition.chunks(fmt), live])

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
