"""The simulator trades (issue 16): Poisson fills across the accounts, each pushing the
events Binance pushes for a fill, never on an account driven negative; a negative
balance shows in its events as a wallet below zero; `--trade-rate` on the command line.

Fills are made by calling `Trader.tick` (no thread, no wall clock), events read from the
simulator's real stream over loopback.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from decimal import Decimal

import pytest
from test_simulator_stream import Clock, clock, events, open_stream, sim

from exporter.binance.events import parse_frame
from exporter.simulator import Simulator
from exporter.simulator.demo import Drift
from exporter.simulator.trading import Trader, book_assets
from exporter.triggers import BALANCE, BOTH, Need, Priority, classify

_ = (clock, sim)  # fixtures


def trader(sim: Simulator, rate: float, seed: int = 1) -> Trader:
    book = sim.state.book
    return Trader(
        book.trade, sim.account_names, book_assets(sim.balances), rate=rate, rng=random.Random(seed)
    )


def amounts(record: dict[str, object], *names: str) -> list[Decimal]:
    return [Decimal(str(record[name])) for name in names]


def test_a_fill_pushes_account_update_and_position_and_keeps_the_identities(
    sim: Simulator,
) -> None:
    before = {r["asset"]: r for r in sim.balances("a")}
    with open_stream(sim, "a") as ws:
        assert sim.state.book.trade("a", "USDT", Decimal("1.5"), Decimal("0.25"))
        update, position = events(ws, 2)
    assert update["e"] == "ACCOUNT_UPDATE"
    assert update["fs"] == "UM"
    assert update["a"]["m"] == "ORDER"
    (row,) = update["a"]["B"]
    assert set(row) == {"a", "wb", "cw", "bc"}
    after = {r["asset"]: r for r in sim.balances("a")}["USDT"]
    assert Decimal(row["wb"]) == Decimal(after["umWalletBalance"])
    assert Decimal(row["bc"]) == Decimal("1.5")
    assert position["e"] == "outboundAccountPosition"
    assert position["E"] == update["E"]
    assert position["B"] == [{"a": "USDT", "f": position["B"][0]["f"], "l": position["B"][0]["l"]}]
    assert Decimal(position["B"][0]["f"]) == Decimal(after["crossMarginFree"])
    was = before["USDT"]
    assert amounts(after, "umWalletBalance")[0] - amounts(was, "umWalletBalance")[0] == Decimal(
        "1.5"
    )
    free, locked, um, cm, total, cross = amounts(
        after,
        "crossMarginFree",
        "crossMarginLocked",
        "umWalletBalance",
        "cmWalletBalance",
        "totalWalletBalance",
        "crossMarginAsset",
    )
    assert total == free + locked + um + cm
    assert cross == free + locked
    # what the exporter makes of them: routine, the balance alone
    for event in (update, position):
        assert classify(parse_frame(json.dumps(event)), None) == Need(Priority.EVENT, BALANCE)


def test_trades_come_at_the_rate_and_never_on_an_account_driven_negative(sim: Simulator) -> None:
    sim.set_asset("b", "BTC", negativeBalance="12.5")
    desk = trader(sim, rate=50.0)
    made = sum(desk.tick(1.0) for _ in range(20))
    assert 850 <= desk.trades + desk.refused <= 1150  # 1000 expected, Poisson
    assert made == desk.trades
    assert 350 <= desk.trades <= 650  # a's half
    assert desk.refused >= 350  # b's half: in debt
    assert {r["asset"]: r["negativeBalance"] for r in sim.balances("b")}["BTC"] == "12.5"
    sim.set_asset("b", "BTC", negativeBalance="0")
    assert sim.state.book.trade("b", "BTC", Decimal("0.01"), Decimal("0.01"))
    sim.set_asset("b", "ETH", umWalletBalance="-3")  # a wallet below zero: in debt too
    assert not sim.state.book.trade("b", "BTC", Decimal("0.01"), Decimal("0.01"))
    assert not sim.state.book.trade("a", "NOSUCH", Decimal(1), Decimal(1))
    assert trader(sim, rate=0.0).tick(10.0) == 0


def test_a_negative_balance_shows_as_a_wallet_below_zero(sim: Simulator) -> None:
    with open_stream(sim, "a") as ws:
        sim.set_asset("a", "USDT", negativeBalance="412.5")
        position, update = events(ws, 2)
        assert position["e"] == "outboundAccountPosition"
        assert update["e"] == "ACCOUNT_UPDATE"
        assert update["a"]["B"][0]["wb"] == "-412.5"
        assert update["a"]["B"][0]["cw"] == "-412.5"
        assert classify(parse_frame(json.dumps(update)), None) == Need(Priority.RISK, BOTH)
        sim.set_asset("a", "USDT", negativeBalance="0")  # resolved: the wallet again
        _, back = events(ws, 2)
        assert Decimal(back["a"]["B"][0]["wb"]) >= 0


def test_the_demo_drift_keeps_its_fills_and_skips_its_negative_episode(
    sim: Simulator, clock: Clock
) -> None:
    drift = Drift(sim, assets_per_account=3, rng=random.Random(1))
    desk = Trader(drift.fill, sim.account_names, drift.assets, rate=20.0, rng=random.Random(2))
    desk.tick(1.0)
    assert desk.trades > 5
    served = sim.balances("a") + sim.balances("b")
    drift.tick()  # republishes its portfolios: the fills are in them, nothing undoes one
    kept = sim.balances("a") + sim.balances("b")
    for was, now in zip(served, kept, strict=True):
        assert was["umWalletBalance"] == now["umWalletBalance"]
    clock.advance(20)  # past the first negative episode's start
    drift.tick()
    (negative,) = [
        n for n in sim.account_names if any(r["negativeBalance"] != "0" for r in sim.balances(n))
    ]
    refused = desk.refused
    other = next(n for n in sim.account_names if n != negative)
    desk = Trader(drift.fill, [negative], drift.assets, rate=20.0, rng=random.Random(3))
    desk.tick(1.0)
    assert desk.trades == 0
    assert desk.refused > 5
    assert refused == 0
    assert Trader(drift.fill, [other], drift.assets, rate=20.0, rng=random.Random(3)).tick(1.0)


@pytest.mark.parametrize("bad", ["-1", "fast", "1e9"])
def test_trade_rate_must_be_a_rate(bad: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exporter.simulator", "--trade-rate", bad],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--trade-rate" in done.stderr
