"""The exporter's one clock: what time it is, and how to wait.

Every part that reads the time or waits (budgets, pollers, prices, the state file's
writer, the user data streams and their keep-alive and backoff) gets it from the
`Exporter`, which gets one `Clock`. Production runs on `SYSTEM_CLOCK`: wall time (the
metrics' timestamps and Binance's minute boundaries are wall time) and the running event
loop's timer. Tests pass a virtual one (exporter/simulator/virtualtime.py's EventClock),
on which a minute of polling takes no wall time at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol


class Clock(Protocol):
    """What time it is (seconds since the epoch), and a sleep on the same time."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Wall time, and the running event loop's sleep."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


async def finish_within(
    tasks: Iterable[asyncio.Future[Any]],
    grace: float,
    sleep: Callable[[float], Awaitable[None]],
) -> None:
    """Let `tasks` finish within `grace` seconds of `sleep`'s time (a Clock's sleep, so a
    virtual clock's stop takes no wall time), then cancel what has not and wait for it."""
    tasks = set(tasks)
    if not tasks:
        return
    grace_over = asyncio.ensure_future(sleep(grace))
    every = asyncio.ensure_future(asyncio.wait(tasks))
    try:
        await asyncio.wait((grace_over, every), return_when=asyncio.FIRST_COMPLETED)
    finally:
        grace_over.cancel()
        every.cancel()
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
