"""Wiring: an exporter's snapshot, registry and reloads served over HTTP."""

from __future__ import annotations

from exporter.app import WEB_CONFIG_NAMES, Exporter
from exporter.http import ExporterApp, MetricsServer, ServerLimits, WebConfig
from exporter.selfmetrics import ReloadCollector
from exporter.webconfig import WebConfigFile


def serve_http(
    exporter: Exporter,
    host: str,
    port: int,
    web: WebConfig | WebConfigFile | None = None,
    limits: ServerLimits | None = None,
    *,
    lifecycle: bool = False,
) -> MetricsServer:
    """Serve `exporter`'s /metrics and the other endpoints on host:port, with TLS and auth
    from `web` (a `WebConfigFile` is re-read when it changes); with `lifecycle`,
    `POST /-/reload`. Started; `close()` it."""
    source = None
    if isinstance(web, WebConfigFile):
        source, current = web, web.current
        exporter.registry.register(ReloadCollector(source, *WEB_CONFIG_NAMES))
    else:
        current = web or WebConfig()
    app = ExporterApp(
        exporter.registry,
        exporter.store,
        current,
        exposition=exporter.exposition,
        reload=exporter.reload if lifecycle else None,
    )
    server = MetricsServer(
        app,
        host,
        port,
        current.ssl_context,
        limits,
        web_source=source.check if source is not None else None,
        on_stuck=source.stuck if source is not None else None,
    )
    server.start()
    return server
