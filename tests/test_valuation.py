"""The valuation rule on a table of cases: one unit of an asset in USD, from spot quotes."""

from __future__ import annotations

import pytest

from exporter.binance.models import parse_decimal
from exporter.valuation import Quote, usd_price, usd_value

USD = frozenset({"USDT", "USDC", "FDUSD", "BFUSD", "RWUSD"})
T0, T1 = 1_700_000_000.0, 1_700_000_030.0
QUOTES = {
    "BTCUSDT": Quote(65000.0, T1),
    "ETHUSDT": Quote(3200.0, T1),
    "ETHUSDC": Quote(3100.0, T1),  # never used: USDT comes first
    "ETHBTC": Quote(0.05, T1),  # never used: a direct pair comes first
    "WIFUSDC": Quote(2.5, T1),  # only a USDC pair
    "ENAFDUSD": Quote(0.8, T1),  # only an FDUSD pair
    "ZKBTC": Quote(0.000002, T0),  # only a BTC pair, quoted earlier than BTCUSDT
    "USDCUSDT": Quote(0.9995, T1),  # a USD asset: its own pair is ignored
}

# (case, asset, amount as Binance sends it, expected USD value, expected route)
CASES = [
    ("stablecoin", "USDT", "1234.5", 1234.5, "usd"),
    ("stablecoin with a pair of its own", "USDC", "10", 10.0, "usd"),
    ("PM-only USD token", "BFUSD", "100", 100.0, "usd"),
    ("direct USDT pair", "ETH", "2", 6400.0, "ETHUSDT"),
    ("only a USDC pair", "WIF", "4", 10.0, "WIFUSDC"),
    ("only an FDUSD pair", "ENA", "10", 8.0, "ENAFDUSD"),
    ("only a BTC pair", "ZK", "1000", 130.0, "ZKBTC*BTCUSDT"),
    ("negative amount", "ETH", "-0.5", -1600.0, "ETHUSDT"),
    ("Simple Earn receipt of a stablecoin", "LDUSDT", "50", 50.0, "LD:usd"),
    ("Simple Earn receipt of a coin", "LDETH", "1", 3200.0, "LD:ETHUSDT"),
    ("no route", "NOPE", "5", None, None),
    ("LD prefix without an underlying price", "LDNOPE", "5", None, None),
    ('"" amount', "ETH", "", None, "ETHUSDT"),
    ("zero amount", "ETH", "0", 0.0, "ETHUSDT"),
]


@pytest.mark.parametrize(
    ("asset", "amount", "expected", "route"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_valuation_rule(asset: str, amount: str, expected: float | None, route: str | None) -> None:
    price = usd_price(asset, QUOTES, USD, fetched=T1)
    assert (price.route if price else None) == route
    value = usd_value(parse_decimal(amount), price)
    if expected is None:
        assert value is None
    else:
        assert value == pytest.approx(expected)


def test_a_price_is_as_old_as_its_oldest_quote() -> None:
    zk = usd_price("ZK", QUOTES, USD, fetched=T1)
    assert zk is not None
    assert zk.time == T0
    usdt = usd_price("USDT", QUOTES, USD, fetched=T1)
    assert usdt is not None
    assert usdt.time == T1  # a USD asset: as old as the last fetch
    assert usd_price("USDT", {}, USD).time is None  # type: ignore[union-attr]


def test_a_quote_routes_only_through_an_asset_counted_as_usd() -> None:
    """Without USDC among the USD assets, a USDC pair is a price in USDC, not in USD."""
    assert usd_price("WIF", QUOTES, frozenset({"USDT"})) is None
    eth = usd_price("ETH", QUOTES, frozenset({"USDC"}))
    assert eth is not None
    assert eth.usd == 3100.0


def test_ldo_is_priced_as_itself_not_as_an_earn_receipt() -> None:
    price = usd_price("LDO", {"LDOUSDT": Quote(1.5, T1), "OUSDT": Quote(9.0, T1)}, USD)
    assert price is not None
    assert price.route == "LDOUSDT"
