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
from typing import Protocol


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
