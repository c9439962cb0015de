"""A free TCP port, for a server the test starts that cannot be told to bind port 0."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1", family: socket.AddressFamily = socket.AF_INET) -> int:
    """A port free on `host` a moment ago (another process may take it before the caller
    binds: use it only for programs that cannot report the port they bound)."""
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
