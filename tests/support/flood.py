"""A wrong-password flood from another process: an attacker does not share the test's
interpreter lock, so it runs as fast as the server answers (or faster, hanging up)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

#: The attacker runs at nice 19. A real one spends another machine's CPU; this one shares
#: the exporter's, so it takes only what the exporter (nice 0, its HTTP threads nice 10)
#: leaves: on a loaded machine it would otherwise time the scheduler, not the exporter.
SCRIPT = """
import base64, os, secrets, socket, sys, threading
os.nice(19)
port, clients, source = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
hang_up = sys.argv[4] == "hang-up"
def flood():
    while True:
        token = base64.b64encode(f"prom:{secrets.token_hex(8)}".encode()).decode()
        request = f"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Basic {token}\\r\\n"
        request += "\\r\\n"
        try:
            with socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=(source, 0)
            ) as sock:
                sock.sendall(request.encode())
                if not hang_up:
                    sock.recv(1024)
        except OSError:
            pass
for _ in range(clients):
    threading.Thread(target=flood, daemon=True).start()
sys.stdin.read()  # until the test closes our stdin
"""


@contextlib.contextmanager
def wrong_passwords(
    port: int, clients: int, *, source: str = "127.0.0.1", hang_up: bool = False
) -> Iterator[None]:
    """Wrong passwords for user `prom`, a new one each time, from `clients` threads of
    another process at address `source`; each hangs up at once (`hang_up`) or waits for
    its answer."""
    attacker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(port),
            str(clients),
            source,
            "hang-up" if hang_up else "wait",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        yield
    finally:
        attacker.kill()
        attacker.wait()
