"""The sanity check of the USD valuation: for the simulator's accounts, the sum over
assets of net USD value (assets minus liabilities, each amount times its price as the
exporter serves it) is the account's actualEquity, within 1e-6 of it.

The simulator prices its synthetic assets consistently (one USD price per asset, served
by its spot ticker through USDT, USDC and BTC pairs), so the only difference left is
float rounding; a real account differs by Binance's index prices and haircuts."""

from __future__ import annotations

import random

import pytest
from harness import RunningExporter, accounts, fast_config, wait_until

from exporter.simulator import Simulator, synthetic
from exporter.snapshot import AccountSnapshot
from exporter.valuation import Price

#: relative tolerance of the check (float rounding of ~20 products of 8-decimal amounts)
TOLERANCE = 1e-6
ASSETS = 20  # well-known assets, then ASSET16.. priced through USDC, BTC and USDT pairs


def net_usd(account: AccountSnapshot, price: dict[str, Price | None]) -> float:
    """What the recording rule account:binance_pm_net_usd:sum computes."""
    total = 0.0
    for balance in account.balances:
        found = price[balance.asset]
        assert found is not None, f"{balance.asset} has no price"
        v = balance.values
        units = (
            v.get("totalWalletBalance", 0.0)
            + v.get("umUnrealizedPNL", 0.0)
            + v.get("cmUnrealizedPNL", 0.0)
            - v.get("crossMarginBorrowed", 0.0)
            - v.get("crossMarginInterest", 0.0)
            - abs(v.get("negativeBalance", 0.0))
        )
        total += units * found.usd
    return total


def test_net_usd_of_every_simulated_account_is_its_actual_equity() -> None:
    generated = accounts(3)
    with Simulator([g.sim_account for g in generated], assets_per_account=ASSETS) as sim:
        # One account with a negative balance, its equity recomputed as the API would.
        name = generated[0].sim_account.name
        portfolio = synthetic.make_portfolio(random.Random(1), ASSETS, sim.state.now_ms())
        portfolio[3].negative = synthetic.amount(12.5)
        sim.set_balances(name, [a.record() for a in portfolio])
        risk = synthetic.make_risk(random.Random(2))
        sim.set_account_info(name, synthetic.account_info(portfolio, risk, sim.state.now_ms()))
        with RunningExporter(fast_config(sim.url, generated)) as running:
            exporter = running.exporter
            wait_until(lambda: not exporter.store.current.pending, what="every account refreshed")
            wait_until(lambda: exporter.price_store.current.fetched, what="prices fetched")
            snapshot = exporter.store.current
            book = exporter.price_store.current
    routes = {book.price(a).route for a in snapshot.assets if book.price(a)}  # type: ignore[union-attr]
    assert {"usd", "BTCUSDT", "ASSET16USDC", "ASSET17BTC*BTCUSDT", "ASSET18USDT"} <= routes
    prices = {asset: book.price(asset) for asset in snapshot.assets}
    for account in snapshot.accounts.values():
        assert account.info is not None
        equity = account.info.values["actualEquity"]
        assert net_usd(account, prices) == pytest.approx(equity, rel=TOLERANCE), account.name
