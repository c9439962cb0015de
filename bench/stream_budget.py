"""Event-triggered refreshes against the weight budget, on virtual time (issue 9).

The real EgressPoller and WeightBudget, an httpx.MockTransport answering at once, and
a clock that moves only when every task waits: minutes of virtual time in seconds.
Figures:

1. Budget: N accounts on the default budget (B = 1500, w = 40); one account emits
   200 events/s for 60 s. The exporter's weight in every sliding 60 s window (<= B),
   the busy account's triggered refreshes and their smallest gap (>= 2 s), every other
   account's worst interval against its polling-only interval (<= 2x).
2. Freshness: 200 accounts (polling-only interval 323 s); a risk event on a random
   account every 10-20 s: delay from the trigger to its refresh's first request,
   with and without the 200 streams reconnecting at once (200 CATCHUPs queued),
   against the wait for the round-robin turn (polling only).
3. Cost: CPU per 1,000 trigger() calls (coalesced into a pending refresh), and per 1,000
   events through the stream observer (parse, classify, trigger).
4. A desk that trades (issue 16): 200 accounts, Poisson fills at 5 and 50 a second, each
   a fill's two events through the real observer (parse, classify, trigger); 20 events
   driving a random account's USDT below zero: delay to its balance read; the triggered
   reads by endpoint and their weight against B/2; and at 50/s with 20 accounts, every
   account's worst full-read interval against polling-only.

    PYTHONPATH=. python bench/stream_budget.py
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from exporter.binance.client import BinanceClient, Credentials
from exporter.binance.events import parse_frame
from exporter.binance.signing import HmacSigner
from exporter.budget import BudgetLimits, WeightBudget, refresh_interval
from exporter.collectors import enabled
from exporter.logs import configure_logging
from exporter.poller import EgressPoller, PollSettings, Target
from exporter.selfmetrics import Instruments, StreamHealth
from exporter.simulator.virtualtime import EventClock
from exporter.snapshot import AccountSnapshot, SnapshotStore
from exporter.streams import _AccountObserver
from exporter.triggers import Priority

START = 1_700_000_010.0
LIMITS = BudgetLimits(6000, 0.25, 0.8)  # B = 1500 weight/min
W = 40


class Run:
    """n accounts acct-0.. polled on virtual time; `log` holds (time, path, api key)."""

    def __init__(self, n: int) -> None:
        self.clock = EventClock(START)
        self.log: list[tuple[float, str, str]] = []
        self.interval = refresh_interval(n, W, LIMITS, 10.0)
        self.names = [f"acct-{i}" for i in range(n)]
        self.stream = StreamHealth(self.names)
        store = SnapshotStore(AccountSnapshot(name, self.interval) for name in self.names)
        self.poller = EgressPoller(
            targets=[
                Target(n, Credentials(SecretStr(n), HmacSigner(SecretStr("s")))) for n in self.names
            ],
            make_client=partial(
                BinanceClient,
                base_url="http://binance.test",
                timeout_seconds=100,
                recv_window_ms=5000,
                clock=self.clock,
                transport=httpx.MockTransport(self._answer),
            ),
            budget=WeightBudget("default", LIMITS, clock=self.clock, sleep=self.clock.sleep),
            store=store,
            instruments=Instruments(CollectorRegistry()),
            settings=PollSettings(
                allows_asset=lambda a: True,
                interval=self.interval,
                collectors=enabled({}),
            ),
            clock=self.clock,
            sleep=self.clock.sleep,
            stream=self.stream,
        )

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.log.append((self.clock(), request.url.path, request.headers.get("X-MBX-APIKEY", "")))
        if request.url.path.endswith("/time"):
            return httpx.Response(200, json={"serverTime": int(self.clock() * 1000)})
        if request.url.path.endswith("/account"):
            return httpx.Response(200, json={"uniMMR": "3.5", "accountStatus": "NORMAL"})
        return httpx.Response(200, json=[{"asset": "USDT", "crossMarginFree": "1.0"}])

    def run(self, seconds: float, *drivers: Callable[[], Awaitable[None]]) -> None:
        async def go() -> None:
            tasks = [asyncio.create_task(self.poller.run())]
            tasks += [asyncio.create_task(d()) for d in drivers]
            await self.clock.run_until(START + seconds)
            for task in tasks:
                if task.done():
                    task.result()  # a crash, not a figure
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.poller.drain(1)

        asyncio.run(go())

    def starts(self, name: str | None = None) -> list[float]:
        return [t for t, path, k in self.log if path.endswith("/balance") and name in (None, k)]

    def max_window(self) -> int:
        # the server time is read from the futures host, in a weight pool of its own
        spent = [(t, 20) for t, path, _ in self.log if not path.endswith("/time")]
        return max(sum(w for s, w in spent if t <= s < t + 60) for t, _ in spent)


def budget(n: int) -> list[str]:
    run = Run(n)
    busy = "acct-7"

    async def events() -> None:
        await run.clock.sleep(30)
        while run.clock() < START + 90:
            run.poller.trigger(busy, Priority.EVENT)
            await run.clock.sleep(0.005)

    run.run(90 + 3 * run.interval, events)
    mine = run.starts(busy)
    worst = max(
        b - a for name in run.names if name != busy for a, b in itertools.pairwise(run.starts(name))
    )
    triggered = run.stream.triggered.labels(busy, "balance")._value.get()
    gap = min(b - a for a, b in itertools.pairwise(mine))
    return [
        f"{n} accounts, polling-only interval {run.interval:.1f} s; {busy}: 200 events/s for 60 s",
        f"  max weight in any 60 s window: {run.max_window()} of 1500",
        f"  {busy}: {triggered:.0f} triggered refreshes (B/2 pays for"
        f" {750 / W * 60 / 60.5:.1f} a minute), smallest gap {gap:.2f} s (>= 2)",
        f"  other accounts: worst interval {worst:.1f} s = {worst / run.interval:.2f}x polling-only"
        " (<= 2x)",
    ]


def freshness(catchups: bool) -> list[float]:
    run = Run(200)
    rng = random.Random(9)
    risks: list[tuple[float, str]] = []

    async def streams() -> None:
        await run.clock.sleep(20)
        if catchups:
            for name in run.names:
                run.poller.trigger(name, Priority.CATCHUP)
        for _ in range(20):
            await run.clock.sleep(rng.uniform(10, 20))
            name = rng.choice(run.names)
            risks.append((run.clock(), name))
            run.poller.trigger(name, Priority.RISK)

    run.run(360, streams)
    return [next(t for t in run.starts(name) if t >= at) - at for at, name in risks]


def polling_only_wait() -> list[float]:
    """Without the stream: the wait from a random moment to the account's next turn."""
    run = Run(200)
    run.run(2 * run.interval + 20)
    rng = random.Random(9)
    waits = []
    for _ in range(20):
        at = START + rng.uniform(20, run.interval + 20)
        name = rng.choice(run.names)
        waits.append(next(t for t in run.starts(name) if t >= at) - at)
    return waits


def trigger_cost() -> float:
    run = Run(200)
    poller = run.poller
    names = run.names
    loops = 200_000
    began = time.process_time()
    for i in range(loops):
        poller.trigger(names[i % 200], Priority.EVENT)
    return (time.process_time() - began) / loops * 1000 * 1e6


def frame(kind: str, at: float, wb: str = "500.0") -> str:
    if kind == "update":
        rows = [{"a": "USDT", "wb": wb, "cw": wb, "bc": "0.5"}]
        body = {"e": "ACCOUNT_UPDATE", "fs": "UM", "i": "", "a": {"m": "ORDER", "B": rows}}
    else:
        body = {"e": "outboundAccountPosition", "B": [{"a": "ETH", "f": "3.5", "l": "0"}]}
    return json.dumps({**body, "E": int(at * 1000), "T": int(at * 1000)})


def desk(
    n: int, rate: float, seconds: float, negatives: int, pause: tuple[float, float] = (2.0, 3.0)
) -> dict[str, float]:
    run = Run(n)
    rng = random.Random(5)
    observers = {
        name: _AccountObserver(name, run.poller, run.stream, run.clock) for name in run.names
    }
    delays: list[float] = []
    trades = 0

    async def trade() -> None:
        nonlocal trades
        while rate:
            await run.clock.sleep(0.05)
            arrivals = rng.expovariate(rate)
            while arrivals < 0.05:
                events = observers[rng.choice(run.names)]
                for kind in ("update", "position"):
                    events.stream_event(parse_frame(frame(kind, run.clock())))
                trades += 1
                arrivals += rng.expovariate(rate)

    async def danger() -> None:
        await run.clock.sleep(30)
        for name in rng.sample(run.names, negatives):
            at = run.clock()
            observers[name].stream_event(parse_frame(frame("update", at, wb="-412.5")))
            while not [t for t in run.starts(name) if t >= at]:
                await run.clock.sleep(0.01)
            delays.append(next(t for t in run.starts(name) if t >= at) - at)
            await run.clock.sleep(rng.uniform(*pause))

    run.run(seconds, trade, danger)
    reads = {
        e: sum(run.stream.triggered.labels(n, e)._value.get() for n in run.names)
        for e in ("balance", "account")
    }
    worst = max(
        b - a
        for name in run.names
        for a, b in itertools.pairwise(
            [t for t, p, k in run.log if k == name and p.endswith("/account")]
        )
    )
    figures = {
        "trades": trades,
        "balance reads": reads["balance"],
        "account reads": reads["account"],
        "triggered weight/min": (reads["balance"] + reads["account"]) * 20 / seconds * 60,
        "max window": run.max_window(),
        "worst full-read interval x": worst / run.interval,
    }
    if delays:
        figures["median"] = statistics.median(delays)
        figures["worst"] = max(delays)
    return figures


def event_cost() -> float:
    """us CPU per 1,000 events through the observer: parse, classify, trigger (a fill's two
    events on random accounts, 200 accounts, none answered)."""
    run = Run(200)
    observers = [_AccountObserver(n, run.poller, run.stream, run.clock) for n in run.names]
    frames = [frame(kind, START + i) for i in range(500) for kind in ("update", "position")]
    began = time.process_time()
    for i, text in enumerate(frames * 20):
        observers[i % 200].stream_event(parse_frame(text))
    return (time.process_time() - began) / (len(frames) * 20) * 1000 * 1e6


def main() -> None:
    configure_logging("warning")
    print("1. Budget")
    for n in (20, 200):
        print("\n".join(budget(n)))
    print("2. Freshness, 200 accounts: trigger -> first request of the refresh (20 tries)")
    for label, delays in (
        ("risk events, queue short", freshness(catchups=False)),
        ("risk events behind 200 CATCHUPs", freshness(catchups=True)),
        ("polling only (wait for the turn)", polling_only_wait()),
    ):
        print(
            f"  {label:<34} median {statistics.median(delays):7.2f} s, worst {max(delays):7.2f} s"
        )
    print(f"3. Cost: {trigger_cost():.0f} us CPU per 1,000 trigger() calls")
    print(f"   {event_cost():.0f} us CPU per 1,000 events through the observer")
    print("4. A desk that trades (B/2 = 750 weight/min)")
    for n, rate, seconds, negatives in ((200, 0.0, 200, 20), (200, 5.0, 200, 20),
                                        (200, 50.0, 200, 20), (20, 50.0, 300, 0)):  # fmt: skip
        figures = desk(n, rate, seconds, negatives)
        shown = ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
        )
        print(f"  {n} accounts, {rate:g} fills/s: {shown}", flush=True)
    figures = desk(200, 0.0, 200, 20, pause=(0.0, 0.0))
    print(  # B/2 pays for one 40-weight RISK read every 3.2 s: the tries queue for it
        f"  200 accounts, quiet, tries back to back (no pause): median {figures['median']:.2f}"
        f" s, worst {figures['worst']:.2f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
