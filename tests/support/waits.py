"""Waiting on a condition with a deadline: the one wait of the tests that run in wall time
(subprocesses, real sockets, Prometheus). Code on an injected clock does not wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T | None],
    timeout: float = 30.0,
    what: str = "",
    step: float = 0.02,
    *,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `condition` until it returns something truthy, and return that; fail after
    `timeout` seconds. An exception of a type in `ignoring` counts as "not yet" (a server
    still starting), and the last one is in the failure's message."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = condition()
        except ignoring as error:
            last_error, result = error, None
        if result:
            return result
        if time.monotonic() > deadline:
            because = f": {last_error!r}" if last_error is not None else ""
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what or condition}{because}"
            )
        time.sleep(step)  # real time: what it waits for runs in another thread or process
