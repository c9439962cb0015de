"""Demo mode, the exporter's side: beside cli.py, what `--demo` adds to an exporter polling
the bundled simulator (exporter/simulator/demo.py, which knows nothing of the exporter).

`log_usd_totals` logs each account's net USD value every 10 s (`demo_usd_totals`).
`NegativeEpisodes` logs when the simulator's drift starts a negative-balance episode
(`demo_negative_episode_started`) and when the exporter's snapshot, the one /metrics
serves, has it (`demo_negative_episode_on_metrics`, with the seconds between).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from exporter.prices import PriceStore, net_usd
from exporter.snapshot import SnapshotStore

USD_LOG_EVERY_SECONDS = 10.0
log = structlog.get_logger("exporter.demo")


@dataclass(frozen=True)
class Episode:
    """A negative balance the simulator serves from `started` (monotonic seconds) on."""

    account: str
    asset: str
    started: float


class NegativeEpisodes:
    """Demo only: the negative-balance episode the simulator serves now, and when the
    exporter's snapshot (what /metrics serves) first shows it, each logged once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._current: Episode | None = None  # not yet seen on /metrics

    def started(self, account: str, asset: str, negative: str) -> None:
        """Called by the simulator's drift as it starts serving the episode."""
        with self._lock:
            self._current = Episode(account, asset, self._clock())
        log.info("demo_negative_episode_started", account=account, asset=asset, negative=negative)

    def check(self, store: SnapshotStore) -> Episode | None:
        """The current episode if `store` shows it now (logged, and then forgotten)."""
        with self._lock:
            episode = self._current
            if episode is None or episode.account not in store.current.accounts:
                return None
            balances = store.current.accounts[episode.account].balances
            if not any(
                b.asset == episode.asset and b.values.get("negativeBalance") for b in balances
            ):
                return None
            self._current = None
        seconds = self._clock() - episode.started
        log.info(
            "demo_negative_episode_on_metrics",
            account=episode.account,
            asset=episode.asset,
            seconds_after_start=round(seconds, 2),
        )
        return episode

    async def watch(
        self,
        store: SnapshotStore,
        every: float = 0.02,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Look at the store every `every` seconds until cancelled."""
        while True:
            self.check(store)
            await sleep(every)


async def log_usd_totals(
    store: SnapshotStore,
    prices: PriceStore,
    every: float = USD_LOG_EVERY_SECONDS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Demo only: every `every` seconds, each account's net value in USD at the served
    prices beside Binance's actualEquity (Prometheus's recording rules do this for real)."""
    while True:
        await sleep(every)
        book = prices.current
        if book.fetched is None:
            continue
        totals, desk = {}, 0.0
        for account in store.current.accounts.values():
            net, _ = net_usd(account.balances, book)
            desk += net
            equity = None if account.info is None else account.info.values.get("actualEquity")
            totals[account.name] = {"net_usd": round(net, 2), "actual_equity_usd": equity}
        log.info("demo_usd_totals", accounts=totals, desk_net_usd=round(desk, 2))
