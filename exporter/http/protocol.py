"""One HTTP/1.1 connection: h11 parses, deadlines bound the wait for each request, and
answers go out paced by the socket; everything else is asked of its `Host`.

The request line and headers must arrive within `read_header_timeout` in total
(between requests on a kept-alive connection, the first byte within IDLE_SECONDS,
then the same deadline); a request not ended by its blank line is never served.
Errors are written at once and close the connection; other answers keep it alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import h11

from exporter.http.auth import DENIED, Check
from exporter.http.body import Length, pieces, send_blocking
from exporter.http.messages import (
    REASONS,
    Request,
    Response,
    header_bytes,
    raw_response,
    refusal,
    to_request,
)

#: how long a kept-alive connection may wait for its next request (Prometheus keeps its
#: connection between scrapes, commonly 15-60 s apart)
IDLE_SECONDS = 120.0
#: a client that reads nothing of its answer for this long is dropped
SEND_TIMEOUT_SECONDS = 30.0
#: bodies are handed to the socket in pieces of this size, waiting while its buffer is full
WRITE_CHUNK = 256 * 1024


class Host(Protocol):
    """What a connection needs of the server that accepted it."""

    loop: asyncio.AbstractEventLoop
    max_header_bytes: int
    read_header_timeout: float
    extra_headers: list[tuple[str, str]]

    def refusal(self, request: Request, *, hung_up: bool) -> Response | None:
        """The error `answer()` would give at once, without side effects; None if none."""

    def answer(self, request: Request) -> tuple[Response, bool] | Check:
        """The answer and whether it holds a /metrics slot (freed by `metrics_done()`), or
        the check to `verify()` first; `route()` answers as it does, once authorized."""

    def verify(self, check: Check, hung_up: Callable[[], bool]) -> Awaitable[bool]: ...
    def route(self, request: Request) -> tuple[Response, bool]: ...

    def produce(self, request: Request, response: Response) -> Awaitable[Response]:
        """The final answer where `answer()` gave a placeholder (a render, a reload)."""

    def offload(self, send: Callable[[], None]) -> Awaitable[None]: ...
    def metrics_done(self) -> None: ...
    def waiting(self, connection: Connection, waits: bool) -> None: ...
    def forget(self, connection: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One client connection (plain, or TLS once its handshake is done)."""

    def __init__(self, host: Host, sock: socket.socket, peer: str, *, tls: bool) -> None:
        self._host = host
        self.sock = sock
        self._peer = peer
        self.tls = tls
        self.parser = h11.Connection(h11.SERVER, max_incomplete_event_size=host.max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        #: set while the socket's buffer is full; resume_writing() resolves it
        self._drained: asyncio.Future[None] | None = None
        #: a request parsed before the transport existed (see `quick.refused_at_once`)
        self.first: h11.Request | None = None
        #: waiting between requests: the first byte of the next one restarts the deadline
        self._idle = False
        #: the peer half-closed or hung up: a bcrypt check for it is not worth doing
        self.hung_up = False
        #: the connection is closed: nothing more can be written
        self.lost = False
        #: the request being answered came with a body (which is not read)
        self._has_body = False
        #: a TLS socket watched for its first bytes, before any TLS state exists
        self._watched = False

    # before the transport

    def when_readable(self, then: Callable[[], None]) -> None:
        """Call `then` once the socket has bytes to read (or is closed): until then a TLS
        connection is a socket and a timer, with no TLS buffers."""
        self._watched = True

        def readable() -> None:
            self._unwatch()
            try:  # a peer that hangs up unheard never costs a TLS state either
                first = self.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                first = b"\x16"
            except OSError:
                first = b""
            if first == b"\x16":
                then()
            else:  # not a TLS handshake record: hung up, or plain HTTP
                self._drop()

        self._host.loop.add_reader(self.sock.fileno(), readable)

    def _drop(self) -> None:
        """Close a connection that never had a transport."""
        self.lost = True
        if self._deadline is not None:
            self._deadline.cancel()
        self.sock.close()
        self._host.forget(self)

    def _unwatch(self) -> None:
        if self._watched:
            self._watched = False
            self._host.loop.remove_reader(self.sock.fileno())

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.first is not None:
            first, self.first = self.first, None
            self._start(first)

    def data_received(self, data: bytes) -> None:
        if self._idle and self._deadline is not None:
            self._deadline.cancel()
            self._wait_for_request()  # the idle wait is over: the header deadline starts
        self.parser.receive_data(data)
        if self._task is None:
            self._next_request()
        elif len(self.parser.trailing_data[0]) > self._host.max_header_bytes:
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
        self._host.forget(self)

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = self._host.loop.create_future()

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
        self._host.waiting(self, True)
        self._idle = idle
        seconds = IDLE_SECONDS if idle else self._host.read_header_timeout
        self._deadline = self._host.loop.call_later(seconds, self.close)

    def _next_request(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            event = self.parser.next_event()
        except h11.RemoteProtocolError as exc:
            self._refuse(431 if exc.error_status_hint == 431 else 400)
            return
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return
        if not isinstance(event, h11.Request):
            self.close()  # ConnectionClosed, or a body we do not read
            return
        self._start(event)

    def _start(self, event: h11.Request) -> None:
        if header_bytes(event) > self._host.max_header_bytes:
            self._refuse(431)  # arrived whole: h11 caps only what is still incomplete
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._host.waiting(self, False)
        try:
            self._has_body = not isinstance(self.parser.next_event(), h11.EndOfMessage)
        except h11.RemoteProtocolError:
            self._has_body = True
        request = to_request(event, self._peer)
        outcome = self._host.answer(request)
        if isinstance(outcome, Check):
            self._task = self._host.loop.create_task(self._answer_after_bcrypt(request, outcome))
        else:
            self._reply(request, *outcome)

    async def _answer_after_bcrypt(self, request: Request, check: Check) -> None:
        try:
            authorized = await self._host.verify(check, lambda: self.hung_up)
        finally:
            self._task = None
        if self.hung_up:
            self.abort()  # nobody is listening for the answer
            return
        self._reply(request, *(self._host.route(request) if authorized else (DENIED, False)))

    def _reply(self, request: Request, response: Response, metrics: bool) -> None:
        """Errors are written at once and close the connection (a flood of them must cost
        little); other answers go out through h11, paced by the socket, and keep it alive."""
        if response.status < 400:
            self._task = self._host.loop.create_task(self._answer(request, response, metrics))
            return
        assert self.transport is not None
        self.transport.write(raw_response(request, response, self._host.extra_headers))
        self.close()

    async def _answer(self, request: Request, response: Response, metrics: bool) -> None:
        try:
            response = await self._host.produce(request, response)
            keep_alive = not self.lost and await self._send(request, response)
        except (OSError, h11.LocalProtocolError):
            keep_alive = False
        finally:
            self._task = None
            if metrics:
                self._host.metrics_done()
        if not keep_alive or self.hung_up:
            self.close()
            return
        self.parser.start_next_cycle()
        self._wait_for_request(idle=True)
        self._next_request()  # a pipelined request may be buffered already

    def _done(self) -> bool:
        return self.parser.our_state is h11.DONE and self.parser.their_state is h11.DONE

    async def _send(self, request: Request, response: Response) -> bool:
        """Write `response`; whether the connection may serve another request."""
        assert self.transport is not None
        length = sum(map(len, response.body))
        keep_alive = not self._has_body and not self.hung_up
        head = [*response.headers, *self._host.extra_headers, ("Content-Length", str(length))]
        if not keep_alive:
            head.append(("Connection", "close"))
        reason = REASONS.get(response.status, "").encode()
        status_line = self.parser.send(
            h11.Response(status_code=response.status, headers=head, reason=reason)
        )
        body = request.method != "HEAD"
        if body:  # h11 counts the body's length; the chunks themselves go out as they are
            self.parser.send_with_data_passthrough(h11.Data(data=Length(length)))  # type: ignore[arg-type]
        if (
            length > WRITE_CHUNK
            and body
            and not self.tls
            and self.transport.get_write_buffer_size() == 0
        ):
            # A large body goes out from a worker thread with a blocking send, as the
            # threaded server did: on loopback the kernel does the receiver's work inside
            # send(), which then runs on both cores, and this loop stays free meanwhile.
            # Through the loop's transport instead, 5 MB of text took 1.54-1.66x our own
            # constant answer against 1.33-1.93x this way (bench/README.md, issue 20).
            chunks = [status_line or b"", *response.body]
            chunks.append(self.parser.send(h11.EndOfMessage()) or b"")
            await self._host.offload(lambda: send_blocking(self.sock, chunks, SEND_TIMEOUT_SECONDS))
            return keep_alive and self._done()
        self.transport.write(status_line or b"")
        if body:
            for piece in pieces(response.body, WRITE_CHUNK):
                if self._drained is not None:
                    await self._drained
                if self.lost:
                    return False
                self.transport.write(piece)
        self.transport.write(self.parser.send(h11.EndOfMessage()) or b"")
        return keep_alive and self._done()

    def _refuse(self, status: int) -> None:
        """Answer a request h11 could not take (headers too large, malformed) and close."""
        assert self.transport is not None
        self.transport.write(raw_response(None, refusal(status), self._host.extra_headers))
        self.close()

    def close(self) -> None:
        if self.transport is None:
            self._end_handshake()
        elif not self.transport.is_closing():
            self.transport.close()
            # close() waits for the write buffer; a peer that never reads would hold it.
            self._host.loop.call_later(1.0, self.transport.abort)
        self._host.forget(self)

    def abort(self) -> None:
        self._end_handshake()
        if self.transport is not None:
            self.transport.abort()
        self._host.forget(self)

    def _end_handshake(self) -> None:
        """Before a transport: close the watched socket, or fail a TLS handshake in progress
        (the transport then closes the socket itself); after: fail a worker's send."""
        if self.transport is None and self._watched:
            self._unwatch()
            self._drop()
            return
        if self.transport is None:
            self.lost = True  # waiting for a handshake turn: never starts one
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
