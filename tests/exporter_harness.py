"""A real Exporter polling a simulator in a background thread, for end-to-end tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from exporter.app import Exporter
from exporter.config import Config, parse_config
from exporter.server import MetricsServer
from exporter.shard import Shard
from exporter.simulator.demo import GeneratedAccount, exporter_config


def wait_for(condition: Callable[[], object], timeout: float = 15.0, what: str = "") -> None:
    """Wait until `condition()` is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


def sim_config(
    url: str,
    generated: list[GeneratedAccount],
    budget: dict[str, Any] | None = None,
    *,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Config for an exporter polling the simulator at `url`; `extra` adds keys per account."""
    data = exporter_config(url, generated, budget=budget)
    for account in data["accounts"]:
        account.update((extra or {}).get(account["name"], {}))
    return parse_config(data, environ={}, base_dir=Path.cwd())


class Running:
    """An exporter polling in a thread of its own, and its HTTP server."""

    def __init__(self, exporter: Exporter, server: MetricsServer) -> None:
        self.exporter = exporter
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="exporter", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self.exporter.run(self._stop))
        except BaseException as exc:  # surfaced in the test's thread
            self._failure.append(exc)

    def stop_polling(self) -> None:
        """Stop the pollers (the server keeps serving the last snapshot)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)
        assert not self._thread.is_alive(), "the exporter did not stop"
        if not self._loop.is_closed():
            self._loop.close()
        if self._failure:
            raise self._failure[0]


@contextmanager
def running_exporter(config: Config, shard: Shard | None = None) -> Iterator[Running]:
    """Poll and serve until the block ends; then stop the pollers and the server."""
    exporter = Exporter(config, shard=shard) if shard is not None else Exporter(config)
    server = exporter.serve_http("127.0.0.1", 0)
    running = Running(exporter, server)
    try:
        yield running
    finally:
        try:
            running.stop_polling()
        finally:
            server.close()
