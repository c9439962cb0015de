"""The web config kept current: its source is looked at every few seconds in a thread of
its own (never the /metrics workers), and a look that does not end in time is reported."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable

import structlog

from exporter.http.site import WebConfig

log = structlog.get_logger("exporter.http")

#: how often the web config's files are looked at for a change (a stat each)
WEB_CONFIG_CHECK_SECONDS = 2.0
#: a look at the web config's files that takes longer is reported stuck (it never should:
#: every file is read without blocking)
WEB_CONFIG_TIMEOUT_SECONDS = 10.0


class WebConfigWatcher:
    """Calls `source` (which loads a changed web config, certificates included) and hands
    each new web config to `use`, on `loop`; `on_stuck` once when a look outlasts `timeout`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source: Callable[[], WebConfig],
        use: Callable[[WebConfig], None],
        *,
        on_stuck: Callable[[], None] | None = None,
        timeout: float = WEB_CONFIG_TIMEOUT_SECONDS,
    ) -> None:
        self._loop, self._source, self._use = loop, source, use
        self._on_stuck = on_stuck
        self._timeout = timeout
        self.every = min(WEB_CONFIG_CHECK_SECONDS, timeout / 2)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="web-config")
        self._looking: concurrent.futures.Future[WebConfig] | None = None
        self._started = 0.0
        self._reported = False
        self._closed = False

    def start(self) -> None:
        self._loop.call_later(self.every, self._look)

    def _look(self) -> None:
        if self._closed:
            return
        if self._looking is None:
            self._started = self._loop.time()
            self._looking = self._thread.submit(self._source)
            self._looking.add_done_callback(self._hand_back)
        elif self._loop.time() - self._started > self._timeout and not self._reported:
            self._reported = True  # once per stuck look, not at every check
            log.error("web_config_check_stuck", seconds=self._timeout)
            if self._on_stuck is not None:
                self._on_stuck()
        self._loop.call_later(self.every, self._look)

    def _hand_back(self, future: concurrent.futures.Future[WebConfig]) -> None:
        """In the look's thread: its result to the loop, unless the watcher has closed (a
        look that ended after shutdown; its loop may be closed, and calling into a closed
        loop raised, logged with a traceback from a stray thread)."""
        if self._closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed since: nobody to tell
            self._loop.call_soon_threadsafe(self._looked, future)

    def _looked(self, future: concurrent.futures.Future[WebConfig]) -> None:
        self._looking, self._reported = None, False
        if not (self._closed or future.cancelled() or future.exception() is not None):
            self._use(future.result())

    def close(self) -> None:
        self._closed = True
        self._thread.shutdown(wait=False, cancel_futures=True)
