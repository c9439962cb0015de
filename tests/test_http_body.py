"""A body's chunks on their way out: every byte once, in order, whatever the socket takes."""

from __future__ import annotations

import socket
import threading

from exporter.http.body import IOV_MAX, pieces, send_blocking


def chunks_of(count: int) -> list[bytes]:
    return [f"{index:06d}:".encode() * (1 + index % 50) for index in range(count)]


def test_send_blocking_sends_every_chunk_once_through_partial_sends() -> None:
    chunks = [b"", *chunks_of(3 * IOV_MAX + 7), b"x" * 300_000, b""]
    expected = b"".join(chunks)
    sender, receiver = socket.socketpair()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # many partial sendmsg calls
    received = bytearray()

    def read() -> None:
        while len(received) < len(expected):
            received.extend(receiver.recv(1000))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        send_blocking(sender, chunks, timeout=10)
        reader.join(10)
    finally:
        sender.close()
        receiver.close()
    assert bytes(received) == expected


def test_pieces_join_small_chunks_and_cut_large_ones() -> None:
    chunks = [*chunks_of(500), b"y" * 2500, *chunks_of(3)]
    out = pieces(chunks, 1000)
    assert b"".join(out) == b"".join(chunks)
    assert all(len(piece) < 2000 for piece in out)
    assert len(out) < len(chunks) / 4
