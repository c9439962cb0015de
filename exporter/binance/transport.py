"""The HTTP transport of a route: through its proxy, every connection from its source address.

httpx 0.28 and httpcore 1.0 drop `local_address` once a proxy is set: httpx's
`AsyncHTTPTransport` does not hand it to its proxy pools, and httpcore's proxy
connections never receive it (pydantic/httpx2#1172 fixes it in the fork). What every
connection of a pool, proxied or not, is built with is the pool's network backend. So
a route with both gets httpx's own proxy transport whose backend binds every TCP
connection, the one to the proxy included, to the source address.
"""

from __future__ import annotations

from collections.abc import Iterable

import httpcore
import httpx

from exporter.route import Route


class _BoundBackend(httpcore.AnyIOBackend):
    """httpcore's asyncio backend, every TCP connection made from one local address."""

    def __init__(self, source_address: str) -> None:
        self._source_address = source_address

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await super().connect_tcp(host, port, timeout, self._source_address, socket_options)


def route_transport(route: Route) -> httpx.AsyncHTTPTransport:
    """httpx's transport for `route`: its proxy (credentials included), its source address."""
    if route.proxy is None:
        return httpx.AsyncHTTPTransport(local_address=route.source_address, trust_env=False)
    transport = httpx.AsyncHTTPTransport(proxy=route.proxy, trust_env=False)
    if route.source_address is not None:
        pool = transport._pool
        # A private attribute: if a new httpx or httpcore renames it, fail here rather
        # than connect to the proxy from another address than the one configured.
        if not isinstance(getattr(pool, "_network_backend", None), httpcore.AsyncNetworkBackend):
            raise RuntimeError("this httpx cannot bind a proxy's connections to source_address")
        pool._network_backend = _BoundBackend(route.source_address)
    return transport
