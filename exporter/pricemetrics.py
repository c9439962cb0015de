"""The price families, rendered at scrape time from the current snapshot and price book.

One series per asset held by any polled account (not every symbol Binance lists), so
the recording rules can multiply each amount by its price (`* on(asset) group_left`).
Reading two immutable values and a few dictionary look-ups per held asset: nothing here
talks to Binance.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.prices import PriceStore
from exporter.snapshot import AccountSnapshot, Snapshot, SnapshotStore

PRICE_HELP = (
    "Price of one unit of the asset in USD: 1 for prices.usd_assets, else from "
    "GET /api/v3/ticker/price by the valuation rule (AUSDT, AUSDC, AFDUSD, ABTC x BTC, "
    "LD<A> as A); absent when no route leads to USD."
)
TIME_HELP = (
    "When the spot prices behind the asset's USD price were last read from Binance "
    "(the oldest of them)."
)


class PriceCollector(Collector):
    def __init__(self, snapshots: SnapshotStore, prices: PriceStore) -> None:
        self._snapshots = snapshots
        self._prices = prices
        #: each account's assets, by the snapshot object they came from: walking every
        #: balance of 200 x 30 at each scrape was 0.45 ms of the live part's ~2.5
        self._held: dict[str, tuple[AccountSnapshot, frozenset[str]]] = {}
        self._sorted: list[str] = []
        self._lock = threading.Lock()

    def _assets(self, snapshot: Snapshot) -> list[str]:
        """Every asset any account holds (as `Snapshot.assets`), sorted."""
        with self._lock:
            held = {}
            changed = len(snapshot.accounts) != len(self._held)
            for name, account in snapshot.accounts.items():
                cached = self._held.get(name)
                if cached is None or cached[0] is not account:
                    assets = frozenset(b.asset for b in account.balances)
                    changed = changed or cached is None or assets != cached[1]
                    cached = (account, assets)
                held[name] = cached
            self._held = held
            if changed:
                self._sorted = sorted(frozenset[str]().union(*(a for _, a in held.values())))
            return self._sorted

    def collect(self) -> Iterable[Metric]:
        book = self._prices.current
        held = self._assets(self._snapshots.current)
        price = GaugeMetricFamily("binance_pm_asset_price_usd", PRICE_HELP, labels=["asset"])
        updated = GaugeMetricFamily(
            "binance_pm_price_update_timestamp_seconds", TIME_HELP, labels=["asset"]
        )
        for asset in held:
            found = book.price(asset)
            if found is None:
                continue
            price.add_metric([asset], found.usd)
            if found.time is not None:
                updated.add_metric([asset], found.time)
        yield from (price, updated)
