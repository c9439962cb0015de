"""Proxies on loopback for the route tests: each connects on from an exit address of its
own, so the simulator (Binance) sees where an account's traffic really left from.

`running(*proxies)` serves any of them (anything with `port` and `serve`) from an event
loop in a thread of its own, in front of a client in a test's own loop or of the whole
exporter. `RecordingProxy` carries both an account's REST requests and its user data
stream's WebSocket (a CONNECT tunnel); `Socks5Proxy` the WebSocket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit


class Proxy(Protocol):
    port: int

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle one client connection."""


@contextlib.contextmanager
def running(*proxies: Proxy) -> Iterator[None]:
    """The proxies listening on loopback (each `port` set), served by a loop of their own."""
    loop = asyncio.new_event_loop()
    servers = []
    for proxy in proxies:
        server = loop.run_until_complete(asyncio.start_server(proxy.serve, "127.0.0.1", 0))
        proxy.port = server.sockets[0].getsockname()[1]
        servers.append(server)
    thread = threading.Thread(target=loop.run_forever, name="proxies", daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        for server in servers:
            server.close()
            loop.run_until_complete(server.wait_closed())
        loop.close()


@dataclass(frozen=True)
class Seen:
    """One request as a proxy saw it."""

    client_ip: str
    user: str | None
    password: str | None
    api_key: str | None
    method: str = "GET"


@dataclass
class RecordingProxy:
    """An HTTP proxy: known users get through, from their exit address; others get a 407.

    It forwards absolute-URI requests (as httpx proxies http:// origins) one per
    connection, and tunnels CONNECT (as the WebSocket client asks for any origin) to
    loopback only, as tests may: another target gets a 502.
    """

    #: user -> (password, exit address the upstream connection is made from)
    users: dict[str, tuple[str, str]]
    port: int = 0
    seen: list[Seen] = field(default_factory=list)

    def url(self, user: str) -> str:
        return f"http://{user}:{self.users[user][0]}@127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        method, target, version = request_line.split(" ")
        headers = [(k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in lines)]
        found = {k.lower(): v for k, v in headers}
        user = password = None
        if found.get("proxy-authorization", "").startswith("Basic "):
            decoded = base64.b64decode(found["proxy-authorization"][6:]).decode()
            user, _, password = decoded.partition(":")
        client_ip = writer.get_extra_info("peername")[0]
        self.seen.append(Seen(client_ip, user, password, found.get("x-mbx-apikey"), method))
        known = self.users.get(user or "")
        if known is None or known[0] != password:
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
            writer.write(b"Proxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n")
        elif method == "CONNECT":
            host, _, port = target.rpartition(":")
            if _loopback(host):
                await _tunnel(reader, writer, (host, int(port)), known[1])
                return
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        else:
            url = urlsplit(target)
            up_reader, up_writer = await asyncio.open_connection(
                url.hostname, url.port, local_addr=(known[1], 0)
            )
            drop = ("proxy-authorization", "proxy-connection", "connection")
            kept = [f"{k}: {v}" for k, v in headers if k.lower() not in drop]
            path = url.path + (f"?{url.query}" if url.query else "")
            lines = [f"{method} {path} {version}", *kept, "Connection: close", "", ""]
            up_writer.write("\r\n".join(lines).encode("latin-1"))
            response = await up_reader.read()
            up_writer.close()
            response_head, sep, body = response.partition(b"\r\n\r\n")
            writer.write(response_head + b"\r\nConnection: close" + sep + body)
        await writer.drain()
        writer.close()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: never resolved, the tests are offline
        return False


@dataclass
class Socks5Proxy:
    """A SOCKS5 proxy (username/password auth, CONNECT) whose upstream comes from `source`."""

    source: str
    password: str = "socks-s3cret"
    port: int = 0
    #: (target, user:password, client IP) of each connection
    requests: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"socks5://user:{self.password}@127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, count = await reader.readexactly(2)
        assert 2 in await reader.readexactly(count)  # username/password offered
        writer.write(b"\x05\x02")
        _, size = await reader.readexactly(2)
        user = (await reader.readexactly(size)).decode()
        size = (await reader.readexactly(1))[0]
        password = (await reader.readexactly(size)).decode()
        writer.write(b"\x01\x00")
        _, command, _, kind = await reader.readexactly(4)
        assert (command, kind) == (1, 1)  # CONNECT to an IPv4 address
        host = ".".join(str(b) for b in await reader.readexactly(4))
        port = int.from_bytes(await reader.readexactly(2), "big")
        client_ip = writer.get_extra_info("peername")[0]
        self.requests.append((f"{host}:{port}", f"{user}:{password}", client_ip))
        await _tunnel(reader, writer, (host, port), self.source, b"\x05\x00\x00\x01" + bytes(6))


async def _tunnel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: tuple[str, int],
    source: str,
    established: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n",
) -> None:
    """Connect to `target` from `source`, say `established`, then relay both ways."""
    up_reader, up_writer = await asyncio.open_connection(*target, local_addr=(source, 0))
    writer.write(established)
    await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until `source` ends, then close `sink`."""
    with contextlib.suppress(OSError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    sink.close()
