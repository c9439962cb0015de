"""What one peer, or many, may cost: the connection table, eviction, accept pacing,
descriptors, and the listening socket.

- at most `max_connections` (never more than the open-files limit allows); past it,
  the connection that has waited longest for its request is dropped, so a crowd of
  idle or half-sent connections cannot lock a scraper out;
- at most `max_requests` /metrics requests in flight (503 beyond, as node_exporter's
  --web.max-requests);
- connections are accepted ACCEPT_BATCH per turn of the loop, and accept() failing
  for want of descriptors pauses accepting for a moment rather than spinning.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

log = structlog.get_logger("exporter.http")

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


class Evictable(Protocol):
    def abort(self) -> None: ...


class ConnectionTable:
    """The open connections, those waiting for a request (oldest first), and the /metrics
    requests in flight."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.max_connections = min(limits.max_connections, free_files())
        self.open: set[Evictable] = set()
        #: connections waiting for their request, oldest first (a dict keeps order)
        self._waiting: dict[Evictable, None] = {}
        self.in_flight = 0

    def room(self) -> bool:
        """Whether one more connection fits, after evicting the longest waiting if need be."""
        return len(self.open) < self.max_connections or self._evict()

    def _evict(self) -> bool:
        for oldest in self._waiting:
            oldest.abort()
            return True
        return False

    def waiting(self, connection: Evictable, waits: bool) -> None:
        if waits:
            self._waiting[connection] = None
        else:
            self._waiting.pop(connection, None)

    def forget(self, connection: Evictable) -> bool:
        """Drop `connection`; whether it was open."""
        self._waiting.pop(connection, None)
        if connection in self.open:
            self.open.discard(connection)
            return True
        return False

    def start_metrics(self) -> bool:
        """Take a /metrics slot; False when `max_requests` are in flight."""
        if self.in_flight >= self.limits.max_requests:
            return False
        self.in_flight += 1
        return True

    def metrics_done(self) -> None:
        self.in_flight -= 1


class Acceptor:
    """Accepts from a listening socket on the loop, paced, calling `take` for each new
    socket (with its peer address) while the table has room."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        table: ConnectionTable,
        take: Callable[[socket.socket, str], None],
    ) -> None:
        self._loop, self._sock, self._table, self._take = loop, sock, table, take
        self.accepting = False

    def start(self) -> None:
        if not self.accepting:
            self.accepting = True
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def stop(self) -> None:
        if self.accepting:
            self.accepting = False
            self._loop.remove_reader(self._sock.fileno())

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self._table.room():
                self.stop()  # every connection is busy: resume when one ends
                return
            try:
                conn, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("http_accept_paused", reason=errno.errorcode[exc.errno])
                    self.stop()
                    self._loop.call_later(ACCEPT_RETRY_SECONDS, self.start)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            conn.setblocking(False)
            # Small answers go out at once: Nagle's wait for an ACK the client delays
            # made back-to-back scrapes on one connection take 40 ms.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._take(conn, str(address[0]) if isinstance(address, tuple) else "")


def free_files() -> int:
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
