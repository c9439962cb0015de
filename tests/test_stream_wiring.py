"""The user data streams wired into the exporter: the real exporter, the simulator's REST
API and its WebSocket stream over loopback. Events refresh their account ahead of its
turn; a riskLevelChange shows at once; shutdown deletes the listenKeys; the demo shows its
negative episodes about a second after they start."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from decimal import Decimal
from functools import partial
from pathlib import Path

import pytest
from support.harness import RunningExporter, accounts, sim_config
from support.waits import wait_until
from test_stream_danger import frame_at, position, update
from test_triggers import SLOT

from exporter.app import Exporter
from exporter.config import parse_config
from exporter.selfmetrics import StreamHealth
from exporter.simulator import Simulator
from exporter.simulator.demo import start_demo
from exporter.simulator.trading import start_trading
from exporter.simulator.transport import SimTransport
from exporter.simulator.virtualtime import EventClock
from exporter.streams import _AccountObserver

pytestmark = pytest.mark.slow

#: a turn every 100 s per account: only an event can refresh an account in these tests
SLOW = {"min_interval_seconds": 300}


def streams_up(running: RunningExporter, names: list[str]) -> bool:
    text = running.metrics_text()
    return all(f'binance_pm_stream_up{{account="{n}"}} 1.0' in text for n in names)


def test_events_refresh_their_account_and_a_margin_call_shows_at_once() -> None:
    """With the desk trading (5 fills a second): a negative balance and a margin call still
    show within a second or two."""
    generated = accounts(3)
    names = [g.sim_account.name for g in generated]
    with Simulator([g.sim_account for g in generated]) as sim:
        config = sim_config(sim.url, generated, SLOW, stream_url=sim.stream_url)
        with RunningExporter(config) as running:
            wait_until(lambda: streams_up(running, names), what="three streams up")
            trader = start_trading(sim, 5.0, seed=1)
            wait_until(lambda: running.sample("binance_pm_up", account="acct-02") is not None)
            # acct-02's turn is 200 s away: only its stream's event can refresh it now
            asset = sim.balances("acct-02")[0]["asset"]
            sim.set_asset("acct-02", asset, negativeBalance="12.5")
            labels = {"account": "acct-02", "asset": asset}
            wait_until(lambda: running.sample("binance_pm_negative_balance", **labels) == 12.5)
            triggered = running.sample(
                "binance_pm_stream_triggered_refreshes_total", account="acct-02", endpoint="balance"
            )
            assert triggered is not None
            assert triggered >= 1
            events = running.metrics_text()
            assert 'binance_pm_stream_events_total{account="acct-02",event=' in events

            # The refresh a riskLevelChange triggers takes 5 s here: what shows within a
            # second is the event's own figures, applied at once.
            sim.inject_fault("latency", endpoint="/papi/v1/account", account="acct-02", seconds=5)
            info = dict(sim.account_info("acct-02"))
            started = time.monotonic()
            sim.set_account_info(
                "acct-02", {**info, "accountStatus": "MARGIN_CALL", "uniMMR": "1.25"}
            )
            status = {"account": "acct-02", "status": "MARGIN_CALL"}
            wait_until(
                lambda: running.sample("binance_pm_account_status", **status) == 1,
                step=0.02,
                what="the margin call on /metrics",
            )
            shown_after = time.monotonic() - started
            assert running.sample("binance_pm_uni_mmr", account="acct-02") == 1.25
            print(f"riskLevelChange -> binance_pm_account_status: {shown_after:.3f} s")
            assert shown_after <= 1.0
            assert trader.trades > 0
            assert sim.listen_key("acct-02") is not None
        # the exporter stopped: every listenKey was deleted on the way out
        assert [sim.listen_key(n) for n in names] == [None, None, None]


def test_one_change_costs_one_triggered_read_of_the_balance_alone() -> None:
    """A fill pushes ACCOUNT_UPDATE and outboundAccountPosition: one triggered read of
    /papi/v1/balance (20 weight) in the simulator's request log, not two of both."""
    generated = accounts(3)
    names = [g.sim_account.name for g in generated]
    with Simulator([g.sim_account for g in generated]) as sim:
        config = sim_config(sim.url, generated, SLOW, stream_url=sim.stream_url)
        with RunningExporter(config) as running:
            wait_until(lambda: streams_up(running, names), what="three streams up")
            wait_until(lambda: running.sample("binance_pm_up", account="acct-00") == 1)
            poller = running.exporter.poller_of["acct-00"]
            before = len(sim.requests)
            asset = sim.balances("acct-00")[0]["asset"]
            assert sim.state.book.trade("acct-00", asset, Decimal("1.5"), Decimal("0.25"))
            events = (
                {"account": "acct-00", "event": kind}
                for kind in ("ACCOUNT_UPDATE", "outboundAccountPosition")
            )
            for labels in events:
                wait_until(
                    lambda labels=labels: running.sample("binance_pm_stream_events_total", **labels)
                )
            triggered = partial(
                running.sample, "binance_pm_stream_triggered_refreshes_total", account="acct-00"
            )
            wait_until(lambda: triggered(endpoint="balance") == 1, what="the triggered read")
            # both events are in: nothing is pending or in flight, so nothing more will come
            wait_until(
                lambda: (
                    poller._triggers.pending("acct-00") is None
                    and not poller._by_name["acct-00"].in_flight
                ),
                what="the read done",
            )
            reads = [
                (r.path, r.weight)
                for r in sim.requests[before:]
                if r.account == "acct-00" and r.path != "/papi/v1/listenKey"
            ]
            assert reads == [("/papi/v1/balance", 20)]
            assert triggered(endpoint="account") == 0


def _negative(sim: Simulator) -> tuple[str, str] | None:
    """The (account, asset) of the simulator's negative balance, if it has one."""
    for name in sim.account_names:
        for record in sim.balances(name):
            if float(record["negativeBalance"]):
                return name, record["asset"]
    return None


def test_the_demo_shows_a_negative_episode_about_a_second_after_it_starts() -> None:
    """What ./scripts/demo runs: its accounts are polled every 10 s (the budget is the
    default share of the simulator's limit), so only the stream shows the episode sooner.
    The first episode starts at the earliest the demo's can (5 s in), not 5 to 15 s in."""
    sim, data = start_demo(first_episode=(5.0, 5.0))
    try:
        config = parse_config(data, environ={}, base_dir=Path.cwd())
        assert config.budget.min_interval_seconds == 10
        with RunningExporter(config) as running:
            wait_until(lambda: streams_up(running, sim.account_names), what="the demo's streams")
            # the first episode starts 5 s after the simulator
            name, asset = wait_until(lambda: _negative(sim), timeout=30, step=0.01)
            started = time.monotonic()
            labels = {"account": name, "asset": asset}
            wait_until(
                lambda: running.sample("binance_pm_negative_balance", **labels),
                timeout=15,
                step=0.02,
                what=f"the negative balance of {name}",
            )
            shown_after = time.monotonic() - started
    finally:
        sim.stop()
    print(f"demo negative episode -> /metrics: {shown_after:.2f} s")
    assert shown_after <= 3.0


def _danger_first(clock: EventClock, trade_rate: float) -> tuple[list[float], list[float], int]:
    """The whole exporter on the default budget (each of 200 accounts every 323 s), the
    simulator in-process, each account's events through the stream observer the exporter
    would give it (the WebSocket is test_simulator_stream's). The desk fills `trade_rate`
    times a second on random accounts, each fill its ACCOUNT_UPDATE on USDT and its
    outboundAccountPosition on ETH. From 30 s in, 20 negative balances on random accounts,
    one after another, 2-3 s after the previous one showed; they stay, and their accounts
    keep trading, as Binance shows it: USDT's wallet at minus the debt.
    Returns each negative balance's event -> in the snapshot /metrics serves, the weight
    of the busiest 60 s window of the PM API, and the fills."""
    generated = accounts(200)
    names = [g.sim_account.name for g in generated]
    sim = Simulator([g.sim_account for g in generated], clock=clock, assets_per_account=4)
    exporter = Exporter(
        sim_config("http://sim.test", generated),  # the default budget; streams off
        clock=clock,
        transport=SimTransport(sim.state, clock),
    )
    assert exporter.pollers[0].settings.interval == pytest.approx(322.7, abs=0.1)
    health = StreamHealth(names)
    observers = {n: _AccountObserver(n, exporter.poller_of[n], health, clock) for n in names}
    rng = random.Random(5)
    delays: list[float] = []
    fills = 0

    def shown(name: str, asset: str) -> float | None:
        account = exporter.store.get(name)
        balance = next((b for b in account.balances if b.asset == asset), None)
        return None if balance is None else balance.values.get("negativeBalance")

    def usdt_wallet(name: str) -> str:
        """What a fill's ACCOUNT_UPDATE shows of USDT: minus the debt when there is one."""
        usdt = next(r for r in sim.balances(name) if r["asset"] == "USDT")
        debt = float(usdt["negativeBalance"])
        return f"{-debt:.2f}" if debt else f"{rng.uniform(100, 900):.2f}"

    async def desk(tick: float = 0.05) -> None:
        nonlocal fills
        while True:
            await clock.sleep(tick)
            arrivals = 0.0
            while (arrivals := arrivals + rng.expovariate(trade_rate)) < tick:
                name = rng.choice(names)
                now = clock.now()
                observers[name].stream_event(frame_at(update(usdt_wallet(name)), now))
                observers[name].stream_event(frame_at(position(f"{rng.uniform(1, 9):.4f}"), now))
                fills += 1

    async def negatives() -> None:
        await clock.sleep(30)
        for attempt, name in enumerate(rng.sample(names, 20)):
            asset = sim.balances(name)[0]["asset"]
            value = 100.0 + attempt
            at = clock.now()
            sim.set_asset(name, asset, negativeBalance=str(value))
            observers[name].stream_event(frame_at(update(f"{-value}", asset=asset), at))
            while shown(name, asset) != value:
                await clock.sleep(0.01)
            delays.append(clock.now() - at)
            await clock.sleep(rng.uniform(2.0, 3.0))

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(exporter.run(stop))
        trading = asyncio.create_task(desk()) if trade_rate else None
        await clock.run(negatives())
        stop.set()
        if trading is not None:
            trading.cancel()
        await clock.run(task)

    asyncio.run(go())
    assert len(delays) == 20
    spent = [(r.time, r.weight) for r in sim.requests if r.path.startswith("/papi/")]
    windows = [sum(weight for t, weight in spent if end - 60.0 < t <= end) for end, _ in spent]
    return delays, windows, fills


def test_danger_first_at_200_accounts_in_the_whole_exporter_on_virtual_time(
    clock: EventClock,
) -> None:
    """The freshness above without sockets, on a quiet desk (`_danger_first`): a negative
    balance is in the snapshot /metrics serves within a budget slot (1.6 s) of its event,
    20 times on random accounts, in the round robin's first pass: no routine read goes
    before it."""
    delays, windows, _ = _danger_first(clock, 0.0)
    assert max(delays) <= 1.25 * SLOT, delays
    assert statistics.median(delays) <= SLOT / 2 + 0.2, delays
    assert max(windows) <= 1500


def test_danger_first_in_the_whole_exporter_while_the_desk_trades_on_accounts_in_debt(
    clock: EventClock,
) -> None:
    """The same with the desk trading 5 fills a second, on every account, those in debt
    too. Each fill of an account in debt shows USDT below zero, a debt /metrics already
    shows: a change of its amount, not news. Were those fills RISK, from the 12th account
    in debt on (5 x 12/200 fills/s, one 40-weight read each, against the triggered half
    of B: 12.4 weight/s, one such read per 3.2 s) they would fill the RISK lane and each
    new debt would wait behind them (4 s, then 8, 13, 17, 22, 31 s). Every new one is in
    the snapshot within 1.25 budget slots, and no 60 s window holds more than B."""
    delays, windows, fills = _danger_first(clock, 5.0)
    assert fills >= 5 * 60  # the desk traded throughout (about 80 s of it)
    assert max(delays) <= 1.25 * SLOT, delays
    assert statistics.median(delays) <= SLOT / 2 + 0.2, delays
    assert max(windows) <= 1500
