"""A response body's chunks on their way out, never joined: the length h11 counts, a
blocking `sendmsg` from a worker thread, and pieces for writes through a transport."""

from __future__ import annotations

import os
import socket

#: buffers per sendmsg (Linux's IOV_MAX)
IOV_MAX = 1024


class Length:
    """A body as h11 sees it: only its length. h11 passes a `Data` event's object through
    (`send_with_data_passthrough`, as for sendfile); the chunks go out as they are."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def send_blocking(sock: socket.socket, chunks: list[bytes], timeout: float) -> None:
    """Send `chunks` on a duplicate of `sock` (`timeout` for each `sendmsg`; the
    loop's socket stays non-blocking), from a worker thread: IOV_MAX chunks a call, never
    joined (a /metrics body is thousands of cached pieces)."""
    pending: list[bytes | memoryview] = list(chunks)
    with socket.socket(fileno=os.dup(sock.fileno())) as dup:
        dup.settimeout(timeout)
        index = 0
        while index < len(pending):
            batch = pending[index : index + IOV_MAX]
            sent = dup.sendmsg(batch)
            if sent == sum(map(len, batch)):  # the common case: no walk over the batch
                index += len(batch)
                continue
            while sent >= len(pending[index]):
                sent -= len(pending[index])
                index += 1
            if sent:
                pending[index] = memoryview(pending[index])[sent:]


def pieces(chunks: list[bytes], size: int) -> list[bytes | memoryview]:
    """`chunks` regrouped into pieces of about `size` bytes: small ones joined, large ones
    cut (for writes through the transport, where each write is a TLS record or a copy)."""
    pieces: list[bytes | memoryview] = []
    group: list[bytes] = []
    grouped = 0
    for chunk in chunks:
        if len(chunk) >= size:
            if group:
                pieces.append(b"".join(group))
                group, grouped = [], 0
            view = memoryview(chunk)
            pieces += (view[start : start + size] for start in range(0, len(view), size))
            continue
        group.append(chunk)
        grouped += len(chunk)
        if grouped >= size:
            pieces.append(b"".join(group))
            group, grouped = [], 0
    if group:
        pieces.append(b"".join(group))
    return pieces
