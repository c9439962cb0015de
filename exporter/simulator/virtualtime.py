"""Virtual time: the one clock of the tests that need one (an exporter.clock.Clock).

A minute of polling at 200 accounts runs in a moment: `EventClock.sleep` parks the
sleeper, and `run_until` moves the clock, once every ready task has run, to the
earliest sleeper's wake. The tests and bench/stream_budget.py drive the real poller on it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class EventClock:
    """A clock that moves only when every task waits: then to the earliest sleeper's wake."""

    def __init__(self, start: float) -> None:
        self.time = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.time

    def __call__(self) -> float:
        """The time, for the parts that take a `Callable[[], float]` clock."""
        return self.time

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.time + max(seconds, 0.0), next(self._seq), future))
        await future

    async def run_until(self, end: float) -> None:
        """Run the loop's tasks until the clock reaches `end`."""
        while self.time < end:
            await self.advance()

    async def run_to(self, end: float) -> None:
        """Wake every sleeper due by `end`, in order, and stop with the clock at `end`."""
        reached = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (max(end, self.time), next(self._seq), reached))
        while not reached.done():
            await self.advance()
        await self.settle()

    async def run(self, work: Awaitable[T]) -> T:
        """Run `work` to its end, moving the clock whenever every task waits on it."""
        task = asyncio.ensure_future(work)
        while True:
            for _ in range(50):
                await asyncio.sleep(0)
            if task.done():
                return task.result()
            await self.advance()

    async def settle(self) -> None:
        """Let every ready task run; the clock does not move."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self) -> None:
        """Let every ready task run, then move to the earliest sleeper's wake."""
        await self.settle()  # every ready task runs before time moves on
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)  # a cancelled sleep: nobody to wake, no time to move
        if not self._sleepers:
            raise RuntimeError("every task has ended or waits on something else")
        wake, _, future = heapq.heappop(self._sleepers)
        self.time = max(self.time, wake)
        future.set_result(None)
