"""The simulator over real HTTP: a threaded stdlib server on loopback, and its Python API.

HTTP/1.1 keep-alive works (the exporter's httpx pool reuses connections), each
connection gets a daemon thread, and `stop()` closes open connections and waits
for their threads, so no test leaves a thread behind.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from exporter.simulator.admin import PREFIX, handle_admin
from exporter.simulator.auth import SimAccount
from exporter.simulator.endpoints import ApiRequest, Reply, handle, json_reply
from exporter.simulator.state import MAX_CONNECTION_SECONDS, RequestRecord, SimState
from exporter.simulator.stream import PATH_PREFIX, StreamServer

_JOIN_SECONDS = 5.0


class Simulator:
    """A Binance Portfolio Margin API on loopback, for the demo and the tests.

    >>> with Simulator([SimAccount.hmac("a", "key", "secret")]) as sim:
    ...     sim.url.startswith("http://127.0.0.1:")
    True
    """

    def __init__(
        self,
        accounts: Iterable[SimAccount],
        host: str = "127.0.0.1",
        port: int = 0,
        ip_weight_limit: int = 6000,
        clock: Callable[[], float] = time.time,
        *,
        assets_per_account: int = 8,
        seed: int = 0,
        ban_after_429s: int = 3,
        stream_port: int = 0,
        stream_ping_interval: float = 180.0,
        stream_ping_timeout: float = 600.0,
        max_connection_seconds: float = MAX_CONNECTION_SECONDS,
        spot_weight_limit: int = 6000,
    ) -> None:
        self.state = SimState(
            accounts,
            clock=clock,
            ip_weight_limit=ip_weight_limit,
            assets_per_account=assets_per_account,
            seed=seed,
            ban_after_429s=ban_after_429s,
            max_connection_seconds=max_connection_seconds,
            spot_weight_limit=spot_weight_limit,
        )
        self._address = (host, port)
        #: the user data stream, /pm/ws/<listenKey>, on its own port (see stream.py)
        self.stream = StreamServer(
            self.state,
            host,
            stream_port,
            ping_interval=stream_ping_interval,
            ping_timeout=stream_ping_timeout,
        )
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []

    # -------------------------------------------------------------- life cycle

    def start(self) -> Simulator:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._server = _Server(self._address, self.state, self._stopping)
        server = self._server
        self._spawn(lambda: server.serve_forever(poll_interval=0.05), "sim-http")
        try:
            self.stream.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving, close open connections, stop background tasks; idempotent."""
        self._stopping.set()
        self.stream.stop()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._threads += server.close_connections()
        for thread in self._threads:
            thread.join(_JOIN_SECONDS)
        self._threads = [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def every(self, interval_seconds: float, action: Callable[[], None], name: str) -> None:
        """Run `action` every `interval_seconds` in a background thread until `stop()`."""

        def loop() -> None:
            while not self._stopping.wait(interval_seconds):
                action()

        self._spawn(loop, name)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def host(self) -> str:
        return self._bound()[0]

    @property
    def port(self) -> int:
        return self._bound()[1]

    @property
    def url(self) -> str:
        host, port = self._bound()
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def stream_url(self) -> str:
        """The user data stream's base URL; a client connects to `{stream_url}/<listenKey>`."""
        host, port = self.stream.address
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{port}{PATH_PREFIX.rstrip('/')}"

    def _bound(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("simulator not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    # -------------------------------------------------------------- data and faults

    @property
    def account_names(self) -> list[str]:
        return self.state.book.names

    def balances(self, account: str) -> Any:
        return self.state.book.balances(account)

    def account_info(self, account: str) -> Any:
        return self.state.book.account_info(account)

    def set_balances(self, account: str, records: Any) -> None:
        """Serve `records` as the account's /papi/v1/balance, exactly (bad shapes allowed)."""
        self.state.book.set_balances(account, records)

    def set_asset(self, account: str, asset: str, **fields: Any) -> None:
        """Set fields of one asset (as the API sends them), adding the asset if new."""
        self.state.book.set_asset(account, asset, fields)

    def remove_asset(self, account: str, asset: str) -> None:
        self.state.book.remove_asset(account, asset)

    def futures_account(self, account: str, book: str) -> Any:
        """GET /papi/v1/{book}/account as served (book "um" or "cm")."""
        return self.state.book.futures_account(account, book)

    def set_futures_account(self, account: str, book: str, payload: Any) -> None:
        self.state.book.set_futures_account(account, book, payload)

    def set_account_info(self, account: str, info: Any) -> None:
        self.state.book.set_account_info(account, info)

    def inject_fault(
        self,
        kind: str,
        *,
        endpoint: str | None = None,
        account: str | None = None,
        count: int | None = None,
        **params: Any,
    ) -> None:
        """Misbehave for matching requests; see state.FAULT_PARAMS for kinds and params."""
        self.state.inject_fault(kind, endpoint=endpoint, account=account, count=count, **params)

    def clear_faults(self) -> None:
        """End the REST faults and the stream's refusals and silence."""
        self.state.faults.clear()
        self.state.stream.clear()

    def stream_fault(self, kind: str, *, account: str | None = None, **params: Any) -> None:
        """Misbehave on the user data stream; see state.STREAM_FAULT_PARAMS for kinds."""
        self.state.stream_fault(kind, account=account, **params)

    def listen_key(self, account: str) -> str | None:
        """The account's live listenKey, if it has one."""
        return self.state.listen_keys.key_of(account, self.state.now_ms())

    @property
    def clock_offset_ms(self) -> int:
        return self.state.clock_offset_ms

    @clock_offset_ms.setter
    def clock_offset_ms(self, offset_ms: int) -> None:
        self.state.clock_offset_ms = offset_ms

    @property
    def requests(self) -> list[RequestRecord]:
        return self.state.log.snapshot()

    def weight_used(self, client_ip: str = "127.0.0.1") -> int:
        return self.state.weights.used(client_ip, self.state.now_ms())

    def spot_weight_used(self, client_ip: str = "127.0.0.1") -> int:
        """Weight used on the spot API's pool (the price ticker) this minute."""
        return self.state.spot_weights.used(client_ip, self.state.now_ms())

    def fapi_weight_used(self, client_ip: str = "127.0.0.1") -> int:
        """Weight used on the USD-M futures API's pool (its server time) this minute."""
        return self.state.fapi_weights.used(client_ip, self.state.now_ms())

    def set_price(self, symbol: str, price: str | None) -> None:
        """Serve `price` for `symbol` in /api/v3/ticker/price; None removes the symbol."""
        self.state.prices.set(symbol, price)

    def set_symbol_status(self, symbol: str, status: str) -> None:
        """Set a listed symbol's trading status: a BREAK symbol keeps its last price in the
        ticker, as on Binance, and leaves it only when asked `symbolStatus=TRADING`."""
        self.state.prices.set_status(symbol, status)

    def add_foreign_weight(self, client_ip: str, weight: int) -> None:
        self.state.weights.add(client_ip, weight, self.state.now_ms())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # an exporter polling many accounts opens many connections at once

    def __init__(
        self, address: tuple[str, int], state: SimState, stopping: threading.Event
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.state = state
        self.stopping = stopping
        self._live_lock = threading.Lock()
        self._live: dict[socket.socket, threading.Thread] = {}
        super().__init__(address, _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._live_lock:
            self._live[request] = threading.current_thread()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._live.pop(request, None)

    def close_connections(self) -> list[threading.Thread]:
        """Shut open connections (idle keep-alive ones too); return their threads."""
        with self._live_lock:
            live = list(self._live.items())
        for sock, _ in live:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)
        return [thread for _, thread in live]

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away; nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "binance-pm-simulator"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request log is `Simulator.requests`."""

    def _dispatch(self) -> None:
        target = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        client_ip = str(self.client_address[0])
        if target.path.startswith(PREFIX):
            status, answer = handle_admin(
                self.server.state,
                method=self.command,
                path=target.path,
                query=target.query,
                body=body,
                client_ip=client_ip,
            )
            self._send(json_reply(status, answer))
            return
        request = ApiRequest(
            method=self.command,
            path=target.path,
            query=target.query,
            api_key=self.headers.get("X-MBX-APIKEY"),
            client_ip=client_ip,
        )
        self._send(handle(self.server.state, request, self.server.stopping.wait))

    def _send(self, reply: Reply) -> None:
        if reply.reset_after is not None:
            self._send_then_reset(reply)
            return
        self.send_response(reply.status)
        for name, value in self._headers_of(reply):
            self.send_header(name, value)
        self.end_headers()
        if reply.stall_seconds is not None:
            self.server.stopping.wait(reply.stall_seconds)
            self.close_connection = True
            return
        self.wfile.write(reply.body)

    def _headers_of(self, reply: Reply) -> list[tuple[str, str]]:
        given = {name.lower() for name in reply.headers}
        headers = list(reply.headers.items())
        if "content-type" not in given:
            headers.append(("Content-Type", reply.content_type))
        if "content-length" not in given:
            headers.append(("Content-Length", str(len(reply.body))))
        return headers

    def _send_then_reset(self, reply: Reply) -> None:
        """Send the headers and part of the body, then reset the TCP connection (RST)."""
        assert reply.reset_after is not None
        phrase = self.responses.get(reply.status, ("",))[0]
        lines = [f"HTTP/1.1 {reply.status} {phrase}"]
        lines += [f"{name}: {value}" for name, value in self._headers_of(reply)]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + reply.body[: reply.reset_after])
        # Linger on, timeout 0: close() sends RST at once instead of a FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the socket closes for real only once its file objects are closed
        self.connection.close()
        self.close_connection = True
