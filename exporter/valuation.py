"""The valuation rule: what one unit of an asset is worth in USD, from spot prices.

- An asset listed in `prices.usd_assets` counts as 1 USD.
- Any other asset A is priced by the spot symbol AUSDT, else AUSDC, else AFDUSD (each
  only when its quote asset is itself counted as 1 USD),
- else by ABTC x the price of BTC (found the same way),
- else, for A = LD<X> (Binance Simple Earn's flexible receipt, redeemable 1:1 for X and
  not traded on spot), by the price of X;
- else A has no price, and no USD value (never 0).

Pure functions of their arguments, standard library only: the exporter's price metrics,
the simulator's sanity check and the tests all use them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

#: quote assets of the direct routes, in the order they are tried
DIRECT_QUOTES = ("USDT", "USDC", "FDUSD")
#: the bridge of the indirect route: A priced in BTC, BTC priced in USD
BRIDGE = "BTC"
#: prefix of Simple Earn receipts in PM balances (LDUSDT, LDBTC...); priced as the asset
EARN_PREFIX = "LD"


@dataclass(frozen=True, slots=True)
class Quote:
    """A spot symbol's last price, and when it was read (epoch seconds)."""

    price: float
    time: float


@dataclass(frozen=True, slots=True)
class Price:
    """One unit of an asset in USD; `time` is when the oldest quote it uses was read
    (for a USD asset, when prices were last fetched; None before that)."""

    usd: float
    time: float | None
    #: how it was found: "usd", "ETHUSDT", "ETHBTC*BTCUSDT", "LD:USDT"...
    route: str


def usd_price(
    asset: str,
    quotes: Mapping[str, Quote],
    usd_assets: Collection[str],
    fetched: float | None = None,
) -> Price | None:
    """The USD price of one unit of `asset`, or None when no route leads to USD."""
    price = _market_price(asset, quotes, usd_assets, fetched)
    if price is None and asset.startswith(EARN_PREFIX) and len(asset) > len(EARN_PREFIX):
        underlying = _market_price(asset[len(EARN_PREFIX) :], quotes, usd_assets, fetched)
        if underlying is not None:
            return Price(underlying.usd, underlying.time, f"{EARN_PREFIX}:{underlying.route}")
    return price


def usd_value(amount: float | None, price: Price | None) -> float | None:
    """`amount` units in USD; None when the amount is absent (Binance's "") or unpriced."""
    if amount is None or price is None:
        return None
    return amount * price.usd


def _market_price(
    asset: str, quotes: Mapping[str, Quote], usd_assets: Collection[str], fetched: float | None
) -> Price | None:
    if asset in usd_assets:
        return Price(1.0, fetched, "usd")
    direct = _direct(asset, quotes, usd_assets)
    if direct is not None:
        return direct
    in_bridge = quotes.get(asset + BRIDGE)
    if in_bridge is not None and asset != BRIDGE:
        bridge = _direct(BRIDGE, quotes, usd_assets)
        if bridge is not None:
            when = in_bridge.time if bridge.time is None else min(in_bridge.time, bridge.time)
            route = f"{asset}{BRIDGE}*{bridge.route}"
            return Price(in_bridge.price * bridge.usd, when, route)
    return None


def _direct(asset: str, quotes: Mapping[str, Quote], usd_assets: Collection[str]) -> Price | None:
    for quote_asset in DIRECT_QUOTES:
        quote = quotes.get(asset + quote_asset)
        if quote is not None and quote_asset in usd_assets:
            return Price(quote.price, quote.time, asset + quote_asset)
    return None
