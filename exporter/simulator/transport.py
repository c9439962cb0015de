"""The simulator in-process: an httpx transport that calls its request handler directly.

No socket, no thread: a request goes through the same `handle` as over loopback HTTP
(signatures, weight accounting per IP, faults, the request log), and its reply comes back
as an `httpx.Response`. What a socket would do to the client is done on the clock the
transport is given: a `latency` fault sleeps that long; a `stall` sends its headers, then
the client times out reading the body (or, with a stall shorter than its timeout, the
server closes and the body is incomplete); a `reset` is a connection error.

For tests of what the exporter does with answers, on virtual time. The route, proxy and
source-address tests, the attack suite and the end-to-end stacks keep real sockets.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit

import httpx

from exporter.simulator.admin import PREFIX, handle_admin
from exporter.simulator.endpoints import ApiRequest, Reply, handle, json_reply
from exporter.simulator.state import SimState


class Clock(Protocol):
    """The time and a sleep on it (an exporter.clock.Clock, named here so that the
    simulator imports nothing of the exporter): the virtual clock in tests."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SimTransport(httpx.AsyncBaseTransport):
    """Answers every request from `state` as the simulator's server would, from
    `client_ip`, waiting on `clock` where the network would take time."""

    def __init__(self, state: SimState, clock: Clock, client_ip: str = "127.0.0.1") -> None:
        self._state = state
        self._clock = clock
        self._client_ip = client_ip

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        target = urlsplit(str(request.url))
        query = request.url.query.decode("ascii")
        if target.path.startswith(PREFIX):
            status, answer = handle_admin(
                self._state,
                method=request.method,
                path=target.path,
                query=query,
                body=await request.aread(),
                client_ip=self._client_ip,
            )
            return _response(json_reply(status, answer), request)
        delays: list[float] = []
        reply = handle(
            self._state,
            ApiRequest(
                method=request.method,
                path=target.path,
                query=query,
                api_key=request.headers.get("X-MBX-APIKEY"),
                client_ip=self._client_ip,
            ),
            delays.append,  # a latency fault: slept below, on the clock
        )
        read_timeout = request.extensions.get("timeout", {}).get("read")
        delay = sum(delays) + (reply.stall_seconds or 0.0)
        if read_timeout is not None and delay >= read_timeout:
            await self._clock.sleep(read_timeout)
            raise httpx.ReadTimeout("the simulator did not answer in time", request=request)
        if delay > 0:  # an answer at once takes no time: nothing to move the clock for
            await self._clock.sleep(delay)
        if reply.stall_seconds is not None:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body", request=request
            )
        if reply.reset_after is not None:
            raise httpx.ReadError("connection reset by peer", request=request)
        return _response(reply, request)


def _response(reply: Reply, request: httpx.Request) -> httpx.Response:
    headers = dict(reply.headers)
    given = {name.lower() for name in headers}
    if "content-type" not in given:
        headers["Content-Type"] = reply.content_type
    return httpx.Response(reply.status, headers=headers, content=reply.body, request=request)


__all__ = ["SimTransport"]
