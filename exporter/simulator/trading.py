"""A desk that trades: Poisson fills across the simulator's accounts.

Every fill is a small positive change on one asset of one account (its UM wallet and its
cross-margin free balance move), pushed as Binance pushes a fill: an `ACCOUNT_UPDATE`
with `fs`, `a.m = ORDER` and `B` rows of `wb`/`cw`/`bc`, and an
`outboundAccountPosition` (`events.trade_events`). An account driven negative (by a test,
or by the demo's negative episode) is never traded on. `python -m exporter.simulator
--trade-rate N` and the demo run it; the tests call `Trader.tick` themselves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from decimal import Decimal

from exporter.simulator import synthetic
from exporter.simulator.server import Simulator

#: how often the trading thread wakes; fills in between are drawn as a Poisson count
TICK_SECONDS = 0.05

#: one fill: (account, asset, UM wallet change, free balance change) -> False when refused
Fill = Callable[[str, str, Decimal, Decimal], bool]


def fill_changes(rng: random.Random) -> tuple[Decimal, Decimal]:
    """A small positive change of the UM wallet (realised PnL less the fee) and of the
    cross-margin free balance."""
    return synthetic.amount(rng.uniform(0.01, 2.0)), synthetic.amount(rng.uniform(0.001, 0.5))


class Trader:
    """Fills at `rate` per second across `accounts`, each on a random asset of
    `assets(account)`, made by `fill`."""

    def __init__(
        self,
        fill: Fill,
        accounts: list[str],
        assets: Callable[[str], list[str]],
        *,
        rate: float,
        rng: random.Random,
    ) -> None:
        self._fill = fill
        self._accounts = accounts
        self._assets = assets
        self.rate = rate
        self._rng = rng
        #: fills made, and fills refused (an account in debt)
        self.trades = 0
        self.refused = 0

    def tick(self, seconds: float) -> int:
        """The fills of `seconds`: a Poisson number of them, at `rate`; how many were made."""
        made = 0
        arrivals = self._rng.expovariate(self.rate) if self.rate > 0 else seconds
        while arrivals < seconds and self._accounts:
            account = self._rng.choice(self._accounts)
            assets = self._assets(account)
            if assets:
                wallet, free = fill_changes(self._rng)
                if self._fill(account, self._rng.choice(assets), wallet, free):
                    made += 1
                else:
                    self.refused += 1
            arrivals += self._rng.expovariate(self.rate)
        self.trades += made
        return made


def book_assets(balances: Callable[[str], object]) -> Callable[[str], list[str]]:
    """The assets an account's served balances hold (none for shapes the API never sends)."""

    def assets(account: str) -> list[str]:
        records = balances(account)
        if not isinstance(records, list):
            return []
        return [
            r["asset"] for r in records if isinstance(r, dict) and isinstance(r.get("asset"), str)
        ]

    return assets


class Clocked:
    """Calls `trader.tick` with the seconds since its last call, by the monotonic clock."""

    def __init__(self, trader: Trader, clock: Callable[[], float] = time.monotonic) -> None:
        self.trader = trader
        self._clock = clock
        self._last = clock()

    def __call__(self) -> None:
        now = self._clock()
        self.trader.tick(max(0.0, now - self._last))
        self._last = now


def start_trading(
    sim: Simulator,
    rate: float,
    *,
    fill: Fill | None = None,
    assets: Callable[[str], list[str]] | None = None,
    seed: int | None = None,
    tick_seconds: float = TICK_SECONDS,
) -> Trader:
    """Trade on the started simulator at `rate` fills per second until `sim.stop()`;
    `fill` and `assets` default to the simulator's own book (the demo's drift passes its
    own, so that its next tick keeps the fills)."""
    trader = Trader(
        fill or sim.state.book.trade,
        sim.account_names,
        assets or book_assets(sim.balances),
        rate=rate,
        rng=random.Random(seed),  # noqa: S311 - made-up fills, not cryptography
    )
    sim.every(tick_seconds, Clocked(trader), name="sim-trading")
    return trader
