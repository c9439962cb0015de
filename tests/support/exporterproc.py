"""The exporter as an operator runs it: `python -m exporter` in a subprocess, its JSON log
lines collected as they come, its HTTP endpoints on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from support import metrics
from support.waits import wait_until

ROOT = Path(__file__).resolve().parents[2]
EXPORTER = (sys.executable, "-m", "exporter")


class ExporterProcess:
    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(
            [*EXPORTER, "--web.listen-address", listen, "--log.format", "json", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,  # noqa: PLW1509 - only to set limits in tests
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = wait_until(
            lambda: (
                next((x for x in self.lines if '"listening"' in x), None)
                or self.popen.poll() is not None
            ),
            timeout=30,
            what="the exporter listening",
        )
        if line is True:
            raise AssertionError("the exporter exited:\n" + "\n".join(self.lines[-20:]))
        self.listening_at = time.monotonic()
        host, _, port = json.loads(line)["address"].rpartition(":")
        self.url = f"http://{host or '127.0.0.1'}:{port}"  # ":PORT" listens everywhere

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append(line.rstrip("\n"))

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found

    def logged(self, name: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The events `name` once there is one: a line is read a little after the effect
        a test may have seen first (a metric), on a loaded machine well after."""
        wait_until(lambda: self.events(name), timeout, f"a {name} log line")
        return self.events(name)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5)

    def sample(self, name: str, **labels: str) -> float | None:
        return metrics.sample(self.get("/metrics").text, name, **labels)

    def cpu_seconds(self) -> float:
        """The process's CPU time so far, user and system (10 ms resolution)."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status(self, key: str) -> float:
        """A figure from /proc/PID/status in MB (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(key)

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM, and the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        code = self.popen.wait(timeout=20)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        self._reader.join(5)


@contextmanager
def running(*args: str, **kwargs: Any) -> Iterator[ExporterProcess]:
    process = ExporterProcess(*args, **kwargs)
    try:
        yield process
    finally:
        process.kill()


@contextmanager
def black_hole() -> Iterator[str]:
    """A URL whose server accepts connections and never answers: requests hang until
    their timeout, so a test can look at the exporter before any refresh completes."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(128)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
