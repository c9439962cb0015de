"""A real exporter running in-process against the simulator, for end-to-end tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from prometheus_client import CollectorRegistry

from exporter.app import Exporter
from exporter.binance.stream import DEFAULT_TIMINGS, StreamTimings
from exporter.collector import SnapshotCollector
from exporter.config import Config, parse_config
from exporter.http import MetricsServer
from exporter.poller import BACKOFF_CAP_SECONDS
from exporter.serve import serve_http
from exporter.shard import WHOLE, Shard
from exporter.simulator.demo import GeneratedAccount, exporter_config, generate_account
from exporter.webconfig import WebConfig, WebConfigFile


def wait_until(
    condition: Callable[[], Any], timeout: float = 30.0, what: str = "", step: float = 0.02
) -> Any:
    """Poll `condition` until it returns something truthy (and return that); fail after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(step)


def reference_registry(exporter: Exporter) -> CollectorRegistry:
    """Everything /metrics serves, rendered by prometheus_client alone: the snapshot's
    families and the served (live) registry. The cached exposition must equal it."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(exporter.store))
    registry.register(exporter.registry)
    return registry


def accounts(n: int, key_types: tuple[str, ...] = ("hmac",)) -> list[GeneratedAccount]:
    return [
        generate_account(f"acct-{i:02d}", key_types[i % len(key_types)])  # type: ignore[arg-type]
        for i in range(n)
    ]


def sim_config(
    url: str,
    generated: list[GeneratedAccount],
    budget: dict[str, Any] | None = None,
    *,
    extra: dict[str, dict[str, Any]] | None = None,
    timeout_seconds: float | None = None,
    stream_url: str | None = None,
) -> Config:
    """Config for an exporter polling the simulator at `url`; `extra` adds keys per account;
    with `stream_url` (the simulator's), the user data streams are on."""
    data = exporter_config(url, generated, budget=budget, stream_url=stream_url)
    for account in data["accounts"]:
        account.update((extra or {}).get(account["name"], {}))
    if timeout_seconds is not None:
        data["binance"]["timeout_seconds"] = timeout_seconds
    return parse_config(data, environ={}, base_dir=Path.cwd())


def fast_config(base_url: str, generated: list[GeneratedAccount], **budget: Any) -> Config:
    """A config that refreshes every second: an IP limit so large the budget never binds."""
    settings = {"ip_weight_limit_per_minute": 60000, "share": 1.0, "min_interval_seconds": 1}
    return sim_config(base_url, generated, {**settings, **budget}, timeout_seconds=2)


class RunningExporter:
    """An exporter polling in a background event loop and serving HTTP on a free loopback
    port. `start()` (or `with`) starts both; `close()` stops polling, then the server."""

    def __init__(
        self,
        config: Config,
        web: WebConfig | WebConfigFile | None = None,
        shard: Shard = WHOLE,
        *,
        clock: Callable[[], float] = time.time,
        backoff_cap: float = BACKOFF_CAP_SECONDS,
        load: Callable[[], Config] | None = None,
        stream_timings: StreamTimings = DEFAULT_TIMINGS,
    ) -> None:
        self.exporter = Exporter(
            config,
            shard=shard,
            clock=clock,
            backoff_cap=backoff_cap,
            load=load,
            stream_timings=stream_timings,
        )
        self.clock = clock
        self.web = web
        self.error: BaseException | None = None
        self.server: MetricsServer | None = None
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="exporter", daemon=True)

    def start(self) -> Self:
        self.server = serve_http(self.exporter, "127.0.0.1", 0, self.web)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self.exporter.run(self._stop))
        except BaseException as exc:  # reported by `alive` and `stop_polling`
            self.error = exc
        finally:
            self._loop.close()

    def call_soon(self, function: Callable[..., Any], *args: Any) -> None:
        """Call `function(*args)` in the exporter's loop, as its stream clients would."""
        self._loop.call_soon_threadsafe(function, *args)

    @property
    def url(self) -> str:
        assert self.server is not None, "not started"
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def alive(self) -> bool:
        """The polling loop is still running, and nothing escaped it."""
        return self._thread.is_alive() and self.error is None

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def sample(self, name: str, **labels: str) -> float | None:
        """The value of one series on /metrics, or None when absent."""
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
        for line in self.metrics_text().splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        return None

    def stop_polling(self) -> None:
        """Stop the pollers (in-flight requests get the exporter's grace); the server keeps
        serving the last snapshot."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)
        assert not self._thread.is_alive(), "the exporter did not stop within 15 s"
        if self.error is not None:
            raise AssertionError("the exporter's loop died") from self.error

    def close(self) -> None:
        try:
            self.stop_polling()
        finally:
            if self.server is not None:
                self.server.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
