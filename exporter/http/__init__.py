"""The HTTP side: /metrics, /, /healthz, /readyz and /-/reload, with TLS and basic auth.

One job per module: `protocol` (h11, deadlines, keep-alive; `quick` refuses a
fresh connection's first request on the raw socket), `limits` (the connection
table, eviction, accept pacing, descriptors), `auth` (the gate: allowed, denied
or pending), `endpoints` (routing, content negotiation, the answers), `tls`
(contexts and handshake bounds), `watch` (the web config kept current),
`messages` and `site` (the values they pass), and `server` (the loop thread
joining them). The rest of the exporter imports only what this module exports;
nothing here loads a config or polls.
"""

from exporter.http.auth import CACHE_SIZE, BasicAuth, CheckPw, Pending, bcrypt_cost
from exporter.http.endpoints import ExporterApp, cacheable_format, gzip_accepted
from exporter.http.limits import ServerLimits, parse_listen_address
from exporter.http.messages import Request, Response
from exporter.http.server import MetricsServer
from exporter.http.site import WebConfig
from exporter.http.tls import (
    TLS_VERSIONS,
    ClientAuthType,
    TLSError,
    TLSSettings,
    TLSVersionName,
    build_context,
)
from exporter.http.watch import WEB_CONFIG_CHECK_SECONDS

__all__ = [
    "CACHE_SIZE",
    "TLS_VERSIONS",
    "WEB_CONFIG_CHECK_SECONDS",
    "BasicAuth",
    "CheckPw",
    "ClientAuthType",
    "ExporterApp",
    "MetricsServer",
    "Pending",
    "Request",
    "Response",
    "ServerLimits",
    "TLSError",
    "TLSSettings",
    "TLSVersionName",
    "WebConfig",
    "bcrypt_cost",
    "build_context",
    "cacheable_format",
    "gzip_accepted",
    "parse_listen_address",
]
