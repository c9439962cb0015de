"""A real exporter running in-process against the simulator, for end-to-end tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx

from exporter.app import Exporter
from exporter.config import Config, parse_config
from exporter.simulator.demo import GeneratedAccount, exporter_config, generate_account
from exporter.webconfig import WebConfig


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


def accounts(n: int, key_types: tuple[str, ...] = ("hmac",)) -> list[GeneratedAccount]:
    return [
        generate_account(f"acct-{i:02d}", key_types[i % len(key_types)])  # type: ignore[arg-type]
        for i in range(n)
    ]


def fast_config(base_url: str, generated: list[GeneratedAccount], **budget: Any) -> Config:
    """A config that refreshes quickly: a large IP limit so the budget never binds tests."""
    settings = {"ip_weight_limit_per_minute": 60000, "share": 1.0, "min_interval_seconds": 1}
    settings.update(budget)
    data = exporter_config(base_url, generated, budget=settings)
    data["binance"]["timeout_seconds"] = 2
    return parse_config(data, environ={}, base_dir=".")  # type: ignore[arg-type]


class RunningExporter:
    """Exporter polling in a background event loop, serving HTTP on a free loopback port."""

    def __init__(self, config: Config, web: WebConfig | None = None) -> None:
        self.exporter = Exporter(config)
        self.server = self.exporter.serve_http("127.0.0.1", 0, web)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="exporter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._loop.run_until_complete(self.exporter.run(self._stop))

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def sample(self, name: str, **labels: str) -> float | None:
        """The value of one series on /metrics, or None when absent."""
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
        for line in self.metrics().splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        return None

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        self.server.close()

    def __enter__(self) -> RunningExporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
