"""The spot API's price ticker, `GET /api/v3/ticker/price?symbolStatus=TRADING`: parsing.

Without `symbol`, the ticker lists every spot symbol's last price,
`[{"symbol": "BTCUSDT", "price": "..."}]`, delisted (`BREAK`) ones too, at the last price
they traded at. `symbolStatus=TRADING` (Binance's spot changelog, 2025-10-28; the official
`binance-sdk-spot`'s `ticker_price(symbol_status=...)`) leaves out every symbol not
trading, at the same weight (4): a symbol absent from the answer has no price.

A body that is not such a list is an `InvalidResponse`; a single entry that is malformed
(no symbol, a price that is not a decimal string) is skipped, and so is a price of 0,
which Binance shows for symbols no longer traded: neither is a price.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from exporter.binance.errors import InvalidResponse
from exporter.binance.models import MalformedRecord, parse_decimal

TICKER_PRICE_PATH = "/api/v3/ticker/price"
#: only the symbols that trade now: a pair that stopped trading has no price
TRADING_ONLY = "symbolStatus=TRADING"


def parse_ticker_prices(payload: object) -> Mapping[str, float]:
    """symbol -> last price, for every well-formed entry with a positive price."""
    if not isinstance(payload, list):
        raise InvalidResponse(f"ticker/price: expected a JSON array, got {type(payload).__name__}")
    prices: dict[str, float] = {}
    for entry in payload:
        if not isinstance(entry, dict):
            continue
        symbol = entry.get("symbol")
        if not isinstance(symbol, str) or not symbol:
            continue
        try:
            price = parse_decimal(entry.get("price"))
        except MalformedRecord:
            continue
        if price is not None and price > 0:
            prices[symbol] = price
    return MappingProxyType(prices)
