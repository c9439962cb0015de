"""exporter/clock.py: finishing work within a grace period on the one clock."""

from __future__ import annotations

import asyncio

from exporter.clock import finish_within
from exporter.simulator.virtualtime import EventClock


def test_work_left_at_stop_is_cancelled_at_the_grace_on_the_clock(clock: EventClock) -> None:
    """A refresh or a stream still busy when the exporter stops gets exactly its grace in
    the clock's seconds (on a virtual clock, no wall time), then is cancelled; work that
    ends sooner ends the wait sooner."""
    start = clock.now()
    ended: dict[str, float] = {}

    async def work(name: str, seconds: float) -> None:
        try:
            await clock.sleep(seconds)
        finally:
            ended[name] = clock.now() - start

    async def go() -> tuple[list[bool], list[bool]]:
        quick = [asyncio.ensure_future(work("quick", 1.0))]
        await clock.run(finish_within(quick, 3.0, clock.sleep))
        stuck = [asyncio.ensure_future(work("stuck", 100.0))]
        await clock.run(finish_within(stuck, 3.0, clock.sleep))
        return [t.cancelled() for t in quick], [t.cancelled() for t in stuck]

    quick, stuck = asyncio.run(go())
    assert quick == [False]
    assert stuck == [True]
    assert ended == {"quick": 1.0, "stuck": 4.0}
