"""The sanity check of the USD valuation: for the simulator's accounts, the sum over
assets of net USD value (assets minus liabilities, each amount times its price as the
exporter serves it) is the account's actualEquity, within 1e-6 of it.

The simulator prices its synthetic assets consistently (one USD price per asset, served
by its spot ticker through USDT, USDC and BTC pairs), so the only difference left is
float rounding; a real account differs by Binance's index prices and haircuts."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from support.faultkit import captured_logs
from support.harness import RunningExporter, accounts, fast_config
from support.waits import wait_until

from exporter.demo import log_usd_totals
from exporter.prices import net_usd
from exporter.simulator import Simulator, synthetic

#: relative tolerance of the check (float rounding of ~20 products of 8-decimal amounts)
TOLERANCE = 1e-6
ASSETS = 20  # well-known assets, then ASSET16.. priced through USDC, BTC and USDT pairs


@pytest.mark.slow
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
    for account in snapshot.accounts.values():
        assert account.info is not None
        equity = account.info.values["actualEquity"]
        net, unpriced = net_usd(account.balances, book)
        assert unpriced == []
        assert net == pytest.approx(equity, rel=TOLERANCE), account.name

    # The demo logs the same figures.
    async def one_round(seconds: float) -> None:
        if rounds:
            raise asyncio.CancelledError
        rounds.append(seconds)

    rounds: list[float] = []
    with captured_logs() as logs, contextlib.suppress(asyncio.CancelledError):
        asyncio.run(log_usd_totals(exporter.store, exporter.price_store, sleep=one_round))
    (event,) = logs.events("demo_usd_totals")
    for name, figures in event["accounts"].items():
        assert figures["net_usd"] == pytest.approx(figures["actual_equity_usd"], abs=0.01), name
