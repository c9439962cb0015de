"""A fresh plain-HTTP connection's first request, refused at once where it can be.

A flood of requests that are refused at once (401, 429, 400, 431) then costs about
a tenth of a millisecond each: no transport, no task, the answer written on the raw
socket.
"""

from __future__ import annotations

import contextlib

import h11

from exporter.http.messages import header_bytes, raw_response, refusal, to_request
from exporter.http.protocol import Connection, Host


def refused_at_once(connection: Connection, host: Host, peer: str) -> bool:
    """Read what `connection` has sent already and, when it is a request refused at
    once, answer it on the raw socket and close it. False: it needs a transport."""
    sock, limit = connection.sock, host.max_header_bytes + 1
    try:
        data = sock.recv(limit)
    except BlockingIOError:
        return False
    except OSError:
        data = b""
    if not data:  # connected and hung up at once (or reset)
        sock.close()
        return True
    connection.parser.receive_data(data)
    try:
        more = sock.recv(limit)
    except BlockingIOError:
        more = None
    except OSError:
        more = b""
    if more:
        connection.parser.receive_data(more)
    hung_up = more == b""  # sent its request and hung up: no bcrypt run for it
    try:
        event = connection.parser.next_event()
    except h11.RemoteProtocolError as exc:
        answer = refusal(431 if exc.error_status_hint == 431 else 400)
        request = None
    else:
        if not isinstance(event, h11.Request):
            return False  # NEED_DATA: the transport will receive the rest
        request = to_request(event, peer)
        if header_bytes(event) > host.max_header_bytes:
            connection.first = event  # refused by _start, with the connection's bookkeeping
            return False
        quick = host.refusal(request, hung_up=hung_up)
        if quick is None:
            connection.first = event  # answered once the transport is there
            return False
        answer = quick
    if not hung_up:
        with contextlib.suppress(OSError):  # it may have gone since: fine
            sock.send(raw_response(request, answer, host.extra_headers))
    sock.close()
    return True
