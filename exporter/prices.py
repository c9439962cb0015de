"""The price source: every spot price from one cheap public request, on a loop of its own.

`GET /api/v3/ticker/price?symbolStatus=TRADING` (weight 4, unsigned) on the spot API
every `prices.interval_seconds`. The spot API counts weight in a pool of its own, so the
source has its own `WeightBudget` (egress `spot:<route>`), reads the spot pool's
`X-MBX-USED-WEIGHT-1M` and obeys its 429 and 418 there: a ban of the spot API pauses
prices only, never the accounts' polling. Each success swaps a new immutable `PriceBook`
into the `PriceStore`; a failure keeps the last book, whose quote times show its age.

The answer lists only the symbols trading now, so it replaces the book's quotes whole: a
symbol that stops trading (BREAK, HALT, delisted) loses its price at once, with one log
event (`symbol_not_trading`), and its asset takes the next route of the valuation rule,
or none. Binance's ticker without the filter keeps listing such a pair at its last price.

Assets held by the polled accounts that the valuation rule cannot price are logged
when they lose their price (`asset_unpriced`: a few names and the count, at most one
line a minute), and when they get one (`asset_priced`); assets no longer held are
forgotten.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import structlog

from exporter.binance import errors
from exporter.binance.client import BinanceClient, RequestReport
from exporter.budget import BudgetLimits, WeightBudget
from exporter.egress import EgressLedger
from exporter.selfmetrics import Instruments
from exporter.snapshot import AssetBalance
from exporter.throttle import LogThrottle
from exporter.valuation import Price, Quote, usd_price
from exporter.weights import SPOT_IP_WEIGHT_LIMIT_PER_MINUTE, WEIGHTS

log = structlog.get_logger("exporter.prices")

ENDPOINT = "ticker_price"
#: the price source's share of the spot pool: 60 weight/min, 7.5 x what the default
#: 30 s interval spends (8/min) and more than the 5 s minimum needs (48/min)
PRICE_BUDGET_SHARE = 0.01
_NO_QUOTES: Mapping[str, Quote] = MappingProxyType({})


#: net value of an asset: these balance fields with their signs (assets minus liabilities;
#: negativeBalance by its size, its sign being undocumented), as account:binance_pm_net_usd:sum
NET_FIELDS = {
    "totalWalletBalance": 1.0,
    "umUnrealizedPNL": 1.0,
    "cmUnrealizedPNL": 1.0,
    "crossMarginBorrowed": -1.0,
    "crossMarginInterest": -1.0,
}


def net_usd(balances: Iterable[AssetBalance], book: PriceBook) -> tuple[float, list[str]]:
    """The net USD value of an account's assets, and the assets left out (no price)."""
    total, unpriced = 0.0, []
    for balance in balances:
        price = book.price(balance.asset)
        if price is None:
            unpriced.append(balance.asset)
            continue
        values = balance.values
        units = sum(sign * values.get(field, 0.0) for field, sign in NET_FIELDS.items())
        total += (units - abs(values.get("negativeBalance", 0.0))) * price.usd
    return total, unpriced


def price_budget_limits(high_water: float) -> BudgetLimits:
    """The price source's budget on the spot pool; pause at `high_water` of the IP's limit."""
    return BudgetLimits(SPOT_IP_WEIGHT_LIMIT_PER_MINUTE, PRICE_BUDGET_SHARE, high_water)


@dataclass(frozen=True, slots=True)
class PriceBook:
    """The last quote of every symbol seen, and when the last fetch succeeded."""

    usd_assets: frozenset[str]
    quotes: Mapping[str, Quote] = field(default_factory=lambda: _NO_QUOTES)
    #: epoch seconds of the last successful fetch (None: none yet)
    fetched: float | None = None

    def price(self, asset: str) -> Price | None:
        return usd_price(asset, self.quotes, self.usd_assets, self.fetched)

    def updated(
        self, prices: Mapping[str, float], now: float, *, complete: bool = False
    ) -> PriceBook:
        """A new book with `prices` read at `now`; symbols not in `prices` keep their quote,
        unless `prices` is `complete` (every symbol that trades): then they have none."""
        quotes = {} if complete else dict(self.quotes)
        quotes.update((symbol, Quote(price, now)) for symbol, price in prices.items())
        return PriceBook(self.usd_assets, MappingProxyType(quotes), now)


class PriceStore:
    """Holds the current `PriceBook`; replaced whole, read by the collector at scrape time."""

    def __init__(self, book: PriceBook) -> None:
        self._lock = threading.Lock()
        self._current = book

    @property
    def current(self) -> PriceBook:
        return self._current

    def replace(self, book: PriceBook) -> None:
        with self._lock:
            self._current = book


class PriceSource:
    """Fetches the spot prices every `interval` seconds within its own budget."""

    def __init__(
        self,
        *,
        make_client: Callable[..., BinanceClient],  # called with observer=
        budget: WeightBudget,
        store: PriceStore,
        instruments: Instruments,
        interval: float,
        held: Callable[[], Iterable[str]] = frozenset,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._ledger = EgressLedger(budget, instruments)
        self._client = make_client(observer=self._observe)
        self._budget = budget
        self._store = store
        self._interval = interval
        self._held = held
        self._clock = clock
        self._sleep = sleep
        self._failure: str | None = None
        #: the held assets without a price at the last refresh
        self._unpriced: set[str] = set()
        #: assets that lost, and found, a price and are not logged yet
        self._pending: tuple[set[str], set[str]] = (set(), set())
        self._unpriced_log = LogThrottle(clock=clock)

    @property
    def budget(self) -> WeightBudget:
        return self._budget

    async def run(self) -> None:
        """Refresh every `interval` seconds until cancelled."""
        next_due = self._clock()
        while True:
            await self.refresh()
            next_due = max(next_due + self._interval, self._clock())
            while (wait := next_due - self._clock()) > 0:
                await self._sleep(wait)

    async def refresh(self) -> bool:
        """One fetch within the budget; True when it brought new prices."""
        await self._budget.acquire(WEIGHTS[ENDPOINT])
        try:
            prices = await self._client.ticker_prices()
            current = self._store.current
            book = current.updated(prices, self._clock(), complete=True)
            self._store.replace(book)
            for symbol in sorted(current.quotes.keys() - book.quotes.keys()):
                log.warning("symbol_not_trading", symbol=symbol)
            self._report_unpriced(book)
        except errors.BinanceError as exc:
            self._note_pause(exc)
            self._log_failure(exc.outcome, getattr(exc, "code", ""), str(exc))
            return False
        except Exception as exc:  # the price loop's one broad boundary: it must not die
            self._log_failure("crashed", "", type(exc).__name__)
            return False
        if self._failure is not None:
            log.info("prices_recovered")
            self._failure = None
        return True

    def _log_failure(self, outcome: str, code: object, error: str) -> None:
        """A warning when the failure changes, not on every refresh of a lasting one."""
        state = f"{outcome}:{code}"
        if state != self._failure:
            self._failure = state
            log.warning("prices_failed", outcome=outcome, error=error)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _report_unpriced(self, book: PriceBook) -> None:
        """Log the held assets that lost or found a price, once each: one line each way
        (10 names and the count) at most once a minute, the rest in the next line; only
        held assets are remembered."""
        held = set(self._held())
        unpriced = {asset for asset in held if book.price(asset) is None}
        lost, found = self._pending
        lost = (lost | (unpriced - self._unpriced)) & unpriced
        found = (found | ((self._unpriced & held) - unpriced)) & (held - unpriced)
        for event, assets in (("asset_unpriced", lost), ("asset_priced", found)):
            if assets and (held_back := self._unpriced_log.allow(event)) is not None:
                names = sorted(assets)
                level = log.warning if event == "asset_unpriced" else log.info
                level(event, assets=names[:10], count=len(names), lines_held_back=held_back)
                assets.clear()
        self._unpriced, self._pending = unpriced, (lost, found)

    # The spot API's clock is not measured: the unsigned ticker needs no offset.

    def _observe(self, report: RequestReport) -> None:
        self._ledger.observe(report, 0.0)

    def _note_pause(self, exc: errors.BinanceError) -> None:
        self._ledger.note_error(exc, 0.0)
