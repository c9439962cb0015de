"""The price source against the simulator's spot ticker over loopback: prices, faults,
its own weight budget, and no effect on the PM polling."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from support.faultkit import captured_logs
from support.harness import RunningExporter, fast_config
from support.waits import wait_until

from exporter.app import Exporter
from exporter.binance.client import BinanceClient
from exporter.budget import BudgetLimits, WeightBudget
from exporter.config import parse_config
from exporter.prices import PriceBook, PriceSource, PriceStore, price_budget_limits
from exporter.selfmetrics import Instruments
from exporter.simulator import Simulator
from exporter.simulator.demo import generate_account
from exporter.simulator.transport import SimTransport
from exporter.simulator.virtualtime import EventClock
from exporter.summary import summarize

TICKER = "/api/v3/ticker/price"
USD = frozenset({"USDT", "USDC", "FDUSD"})


class Setup:
    def __init__(self, sim: Simulator, clock: EventClock, limits: BudgetLimits) -> None:
        self.sim = sim
        self.clock = clock
        self.registry = CollectorRegistry()
        self.instruments = Instruments(self.registry)
        self.budget = WeightBudget("spot:default", limits, clock=clock, sleep=clock.sleep)
        self.store = PriceStore(PriceBook(USD))
        self.source = PriceSource(
            make_client=partial(
                BinanceClient,
                base_url="http://sim.test",
                timeout_seconds=5,
                recv_window_ms=5000,
                clock=clock,
                transport=SimTransport(sim.state, clock),  # in-process: no wall time
            ),
            budget=self.budget,
            store=self.store,
            instruments=self.instruments,
            interval=30.0,
            held=lambda: {"BTC", "ETH", "ASSET16", "ASSET17", "NOPE"},
            clock=clock,
            sleep=clock.sleep,
        )

        self.loop = asyncio.new_event_loop()

    def refresh(self) -> bool:
        return self.loop.run_until_complete(self.clock.run(self.source.refresh()))

    def close(self) -> None:
        self.loop.run_until_complete(self.source.aclose())
        self.loop.close()

    def ticker(self) -> Any:
        """The whole ticker, as a plain GET gets it from the simulator."""

        async def get() -> Any:
            transport = SimTransport(self.sim.state, self.clock)
            async with httpx.AsyncClient(transport=transport, base_url="http://sim.test") as c:
                return (await c.get(TICKER)).json()

        return self.loop.run_until_complete(get())

    def requests(self, outcome: str) -> float:
        value = self.registry.get_sample_value(
            "binance_pm_requests_total", {"endpoint": "ticker_price", "outcome": outcome}
        )
        return value or 0.0


@pytest.fixture
def setup() -> Iterator[Setup]:
    clock = EventClock(1_800_000_000.0)
    made = Setup(Simulator([], clock=clock), clock, price_budget_limits(0.8))  # not started
    yield made
    made.close()


def test_one_request_brings_every_price_and_counts_on_the_spot_pool(setup: Setup) -> None:
    assert setup.refresh()
    book = setup.store.current
    assert book.fetched == setup.clock.time
    btc, asset17 = book.price("BTC"), book.price("ASSET17")
    assert btc is not None
    assert btc.usd == 65000.0
    assert btc.route == "BTCUSDT"
    assert asset17 is not None
    assert asset17.route == "ASSET17BTC*BTCUSDT"
    assert book.price("NOPE") is None
    assert setup.requests("success") == 1
    assert setup.budget.spent_total == 4
    assert setup.budget.last_used_weight == 4
    assert setup.sim.spot_weight_used() == 4
    assert setup.sim.weight_used() == 0  # the PM pool saw nothing


def test_an_unpriced_asset_is_logged_once_not_per_refresh(setup: Setup) -> None:
    with captured_logs() as logs:
        setup.refresh()
        setup.clock.time += 30
        setup.refresh()
    unpriced = logs.events("asset_unpriced")
    assert [e["assets"] for e in unpriced] == [["NOPE"]]


@pytest.mark.slow
def test_new_unpriced_assets_each_refresh_cost_one_line_a_minute_and_are_forgotten(
    setup: Setup,
) -> None:
    """20,000 new asset names per answer wrote one line each and were never forgotten:
    155,000 lines and +18 MB in 40 s."""
    answer = [0]
    setup.source._held = lambda: {f"JUNK{answer[0]}-{i}" for i in range(20_000)} | {"BTC"}
    with captured_logs() as logs:
        for answer[0] in range(8):  # one refresh every 10 s: 80 s
            setup.refresh()
            setup.clock.time += 10
            assert len(setup.source._unpriced) == 20_000  # this answer's, not every one's
            assert len(setup.source._pending[0]) <= 20_000
    unpriced = logs.events("asset_unpriced")
    assert len(unpriced) == 2  # at 0 s and at 60 s
    assert [e["count"] for e in unpriced] == [20_000, 20_000]  # those still held, unpriced
    assert [len(e["assets"]) for e in unpriced] == [10, 10]
    assert unpriced[1]["lines_held_back"] == 5


def test_an_asset_unpriced_while_lines_are_held_back_is_logged_in_the_next_line(
    setup: Setup,
) -> None:
    held = {"BTC", "NOPE"}
    setup.source._held = lambda: held
    with captured_logs() as logs:
        setup.refresh()  # NOPE: logged
        held.add("NOPE2")
        setup.clock.time += 30
        setup.refresh()  # NOPE2: held back
        setup.clock.time += 30
        setup.refresh()  # a minute on: NOPE2 logged
    assert [e["assets"] for e in logs.events("asset_unpriced")] == [["NOPE"], ["NOPE2"]]


FAULTS: list[tuple[str, dict[str, Any], str]] = [
    ("rate_limit", {"retry_after": 30}, "rate_limited"),
    ("ban", {"until_ms": 1_800_000_600_000}, "banned"),
    ("status", {"status": 500}, "server_error"),
    ("status", {"status": 502}, "server_error"),
    ("malformed_json", {"body": '[{"symbol":"BTCUSDT","price":'}, "invalid_response"),
    ("raw", {"body": '{"symbol":"BTCUSDT","price":"1"}'}, "invalid_response"),
]


@pytest.mark.parametrize(
    ("kind", "params", "outcome"), FAULTS, ids=[f"{k}-{o}" for k, _, o in FAULTS]
)
def test_a_fault_keeps_the_last_prices_and_their_age(
    setup: Setup, kind: str, params: dict[str, Any], outcome: str
) -> None:
    assert setup.refresh()
    first = setup.store.current
    fetched_at = setup.clock.time
    setup.clock.time += 40
    setup.sim.inject_fault(kind, endpoint=TICKER, count=1, **params)
    assert not setup.refresh()
    book = setup.store.current
    assert book is first  # kept whole
    price = book.price("ETH")
    assert price is not None
    assert price.usd == 3200.0
    assert price.time == fetched_at
    assert setup.requests(outcome) == 1
    if outcome in ("rate_limited", "banned"):
        assert setup.budget.is_paused(setup.clock.time)
        assert setup.budget.pauses[outcome] == 1
    else:
        assert not setup.budget.is_paused(setup.clock.time)


def test_a_symbol_leaving_the_ticker_loses_its_price_with_one_log_event(setup: Setup) -> None:
    """The ticker asked for TRADING symbols is the whole truth: a symbol absent from it
    has no price (never its last one), and its asset takes the next route."""
    assert setup.refresh()
    setup.clock.time += 30
    setup.sim.set_price("ETHUSDT", None)
    setup.sim.set_price("ASSET17BTC", None)
    setup.sim.set_price("BTCUSDT", "70000.00000000")
    with captured_logs() as logs:
        assert setup.refresh()
        setup.clock.time += 30
        assert setup.refresh()  # still absent: no second log event
    book = setup.store.current
    eth, btc = book.price("ETH"), book.price("BTC")
    assert eth is not None
    assert eth.route == "ETHBTC*BTCUSDT"  # the next route, at today's prices
    assert eth.time == setup.clock.time
    assert btc is not None
    assert btc.usd == 70000.0
    assert book.price("ASSET17") is None  # no route left: unpriced, not 0
    dropped = [e["symbol"] for e in logs.events("symbol_not_trading")]
    assert dropped == ["ASSET17BTC", "ETHUSDT"]


@pytest.mark.parametrize("status", ["BREAK", "HALT"])
def test_a_pair_that_stopped_trading_never_prices_its_asset(setup: Setup, status: str) -> None:
    """Binance's ticker keeps listing a delisted (BREAK) pair at its last price; the source
    asks for TRADING symbols only (the same weight), so the asset is valued by the next
    rule: ETHUSDT dead, ETHUSDC live."""
    setup.sim.set_price("ETHUSDC", "3100.00000000")
    assert setup.refresh()
    eth = setup.store.current.price("ETH")
    assert eth is not None
    assert eth.route == "ETHUSDT"
    setup.sim.set_symbol_status("ETHUSDT", status)
    listed = setup.ticker()  # without the filter: still there
    assert {"symbol": "ETHUSDT", "price": "3200.00000000"} in listed
    setup.clock.time += 30
    with captured_logs() as logs:
        assert setup.refresh()
    eth = setup.store.current.price("ETH")
    assert eth is not None
    assert (eth.route, eth.usd) == ("ETHUSDC", 3100.0)
    assert [e["symbol"] for e in logs.events("symbol_not_trading")] == ["ETHUSDT"]
    assert setup.budget.spent_total == 8  # 4 per ticker, the filter costs nothing more


def test_zero_and_malformed_entries_are_no_price(setup: Setup) -> None:
    setup.sim.set_price("ETHUSDT", "0.00000000")  # Binance's answer for a symbol not traded
    setup.sim.set_price("ETHUSDC", "abc")
    setup.sim.set_price("ETHFDUSD", "3199.5")
    assert setup.refresh()
    eth = setup.store.current.price("ETH")
    assert eth is not None
    assert eth.route == "ETHFDUSD"
    assert eth.usd == 3199.5


def test_the_spot_weight_never_exceeds_its_own_budget() -> None:
    """A tiny budget (20/min: 5 requests) and a 1 s interval: the budget, not the
    interval, binds, and no 60 s window of the simulator's log holds more than 20."""
    clock = EventClock(1_800_000_000.0)
    with Simulator([], clock=clock) as sim:
        setup = Setup(sim, clock, BudgetLimits(6000, 20 / 6000, 0.8))
        setup.source._interval = 1.0
        start = clock.time

        async def run() -> None:
            task = asyncio.create_task(setup.source.run())
            await clock.run_until(start + 600)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        setup.loop.run_until_complete(run())
        setup.close()
        spent = [(r.time, r.weight) for r in sim.requests if r.path == TICKER]
    assert len(spent) >= 40  # about 5 a minute for 10 minutes
    for t0, _ in spent:
        window = sum(w for t, w in spent if t0 <= t < t0 + 60)
        assert window <= 20, (t0, window)


@pytest.mark.slow
def test_a_ban_on_the_spot_api_pauses_prices_only() -> None:
    generated = [generate_account(f"acct-{i}", "hmac") for i in range(2)]
    with Simulator([g.sim_account for g in generated]) as sim:
        sim.inject_fault("ban", endpoint=TICKER, until_ms=sim.state.now_ms() + 600_000)
        with RunningExporter(fast_config(sim.url, generated)) as running:
            exporter = running.exporter
            assert exporter.prices is not None
            wait_until(lambda: exporter.prices.budget.pauses["banned"] == 1, what="price ban")
            before = {n: a.last_success for n, a in exporter.store.current.accounts.items()}
            wait_until(
                lambda: all(
                    (a.last_success or 0) > (before[n] or 0)
                    for n, a in exporter.store.current.accounts.items()
                ),
                what="accounts refreshed after the ban",
            )
            assert all(b.paused_until == 0 for b in exporter.budgets)
            assert exporter.prices.budget.is_paused(exporter.prices.budget.now())
            assert running.sample(
                "binance_pm_paused_until_timestamp_seconds", egress="spot:default"
            )
            assert running.sample("binance_pm_pauses_total", egress="default", reason="banned") == 0
            assert (
                running.sample(
                    "binance_pm_requests_total", endpoint="ticker_price", outcome="banned"
                )
                == 1
            )
        assert sum(r.weight for r in sim.requests if r.path == TICKER) == 0  # refused: free


def test_prices_config_and_summary(tmp_path: Path) -> None:
    account = {"name": "a", "api_key": "k", "api_secret": "s"}
    config = parse_config({"accounts": [account]}, environ={}, base_dir=tmp_path)
    assert config.prices.enabled
    assert config.prices.interval_seconds == 30
    assert config.prices.base_url == "https://api.binance.com"
    assert config.prices.usd_assets == ["USDT", "USDC", "FDUSD", "BFUSD", "RWUSD"]
    assert config.prices.route.label == "default"
    assert (
        "prices: GET https://api.binance.com/api/v3/ticker/price every 30 s = 4 x 2"
        " = 8 weight/min of the spot API's own 6000/min (egress default)" in summarize(config)
    )
    data = {
        "prices": {
            "proxy": "http://user:pr0xy-s3cr3t@proxy.internal:3128",
            "source_address": "127.0.0.2",
            "usd_assets": ["usdt"],
        },
        "accounts": [account],
    }
    config = parse_config(data, environ={}, base_dir=tmp_path)
    assert config.prices.usd_assets == ["USDT"]
    text = summarize(config) + repr(config) + config.model_dump_json()
    assert "pr0xy-s3cr3t" not in text
    assert "user" not in text
    assert "egress source:127.0.0.2,proxy:http://proxy.internal:3128#" in summarize(config)
    off = parse_config(
        {"prices": {"enabled": False}, "accounts": [account]}, environ={}, base_dir=tmp_path
    )
    assert "prices: off" in summarize(off)


def test_the_simulator_serves_the_ticker_on_a_weight_pool_of_its_own() -> None:
    with Simulator([]) as sim, httpx.Client(base_url=sim.url, timeout=5) as http:
        response = http.get(TICKER)
        assert response.status_code == 200
        assert {"symbol": "BTCUSDT", "price": "65000.00000000"} in response.json()
        assert response.headers["X-MBX-USED-WEIGHT-1M"] == "4"
        assert sim.weight_used() == 0
        patched = http.patch("/_sim/prices", json={"BTCUSDT": None, "NEWUSDT": "2.5"})
        assert patched.status_code == 200
        symbols = {entry["symbol"]: entry["price"] for entry in http.get(TICKER).json()}
        assert "BTCUSDT" not in symbols
        assert symbols["NEWUSDT"] == "2.5"
        assert sim.spot_weight_used() == 8
        # A fault that names no endpoint is the PM API's: the ticker is another host.
        sim.inject_fault("status", status=500)
        assert http.get(TICKER).status_code == 200
        assert http.get("/papi/v1/ping").status_code == 500


def test_a_bug_in_one_refresh_does_not_end_the_price_loop(setup: Setup) -> None:
    def broken() -> set[str]:
        raise RuntimeError("held assets unreadable")

    setup.source._held = broken
    with captured_logs() as logs:
        assert not setup.refresh()
    (event,) = logs.events("prices_failed")
    assert event["outcome"] == "crashed"
    assert event["error"] == "RuntimeError"


def test_prices_disabled_means_no_source_and_no_price_series(tmp_path: Path) -> None:
    data = {
        "prices": {"enabled": False},
        "accounts": [{"name": "a", "api_key": "k", "api_secret": "s"}],
    }
    exporter = Exporter(parse_config(data, environ={}, base_dir=tmp_path))
    assert exporter.prices is None
    text = generate_latest(exporter.registry).decode()
    assert "binance_pm_asset_price_usd" not in text
    assert 'egress="spot:' not in text


def test_a_running_exporter_never_values_an_asset_through_a_dead_pair() -> None:
    """The simulator's ticker lists ETHUSDT and SOLUSDT as BREAK, at their old prices;
    /metrics values ETH by its live USDC pair and leaves SOL unpriced (no route left)."""
    generated = [generate_account("desk", "hmac")]
    with Simulator([g.sim_account for g in generated], assets_per_account=8) as sim:
        held = {record["asset"] for record in sim.balances("desk")}
        assert {"ETH", "SOL"} <= held
        sim.set_price("ETHUSDC", "3100.00000000")
        sim.set_symbol_status("ETHUSDT", "BREAK")
        sim.set_symbol_status("SOLUSDT", "BREAK")
        assert {"symbol": "ETHUSDT", "price": "3200.00000000"} in httpx.get(sim.url + TICKER).json()
        with RunningExporter(fast_config(sim.url, generated)) as run:
            wait_until(lambda: run.sample("binance_pm_asset_price_usd", asset="BTC"), 10)
            assert run.sample("binance_pm_asset_price_usd", asset="ETH") == 3100.0
            assert run.sample("binance_pm_asset_price_usd", asset="SOL") is None
            assert run.sample("binance_pm_asset_price_usd", asset="BTC") == 65000.0
