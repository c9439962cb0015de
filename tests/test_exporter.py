"""The whole exporter against the simulator over loopback HTTP: issue 2 end to end."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from support import metrics
from support.harness import RunningExporter, accounts, fast_config, reference_registry
from support.systools import require
from support.waits import wait_until

import exporter
from exporter.app import Exporter
from exporter.logs import configure_logging
from exporter.simulator import Simulator
from exporter.simulator.demo import GeneratedAccount
from exporter.simulator.transport import SimTransport
from exporter.simulator.virtualtime import EventClock

#: the exporter in a thread of its own, over loopback HTTP, in wall time
loopback = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures"


@loopback
def test_seed_page_values_reach_metrics_for_every_key_type(
    sim: Simulator, generated: list[GeneratedAccount]
) -> None:
    seed = json.loads((FIXTURES / "balance_seed.json").read_text())
    info = json.loads((FIXTURES / "account_seed.json").read_text())
    for g in generated:
        sim.set_balances(g.sim_account.name, seed)
        sim.set_account_info(g.sim_account.name, info)
    names = ("acct-00", "acct-01", "acct-02")  # hmac, ed25519, rsa
    with RunningExporter(fast_config(sim.url, generated)) as running:

        def every_account_up() -> metrics.Samples | None:
            scraped = metrics.parse_metrics(running.metrics_text())
            up = all(metrics.sample(scraped, "binance_pm_up", account=n) == 1 for n in names)
            return scraped if up else None

        scraped = wait_until(every_account_up, what="every account up")
    for name in names:
        labels = {"account": name, "asset": "USDT"}
        assert metrics.sample(scraped, "binance_pm_wallet_balance", **labels) == 122607.35137903
        assert metrics.sample(scraped, "binance_pm_cross_margin_asset", **labels) == 92.27530794
        assert metrics.sample(scraped, "binance_pm_cross_margin_interest", **labels) == 0.72469206
        assert metrics.sample(scraped, "binance_pm_cm_unrealized_pnl", **labels) is None  # ""
        assert metrics.sample(scraped, "binance_pm_negative_balance", **labels) == 0
        assert metrics.sample(scraped, "binance_pm_uni_mmr", account=name) == 5167.92171923
        status = {"account": name, "status": "NORMAL"}
        assert metrics.sample(scraped, "binance_pm_account_status", **status) == 1
    build = {"version": exporter.__version__}
    assert metrics.sample(scraped, "binance_pm_exporter_build_info", **build) == 1
    assert sum(r.status == 429 for r in sim.requests) == 0


@loopback
def test_negative_balance_and_vanishing_assets(sim: Simulator, exporter: RunningExporter) -> None:
    wait_until(lambda: exporter.sample("binance_pm_up", account="acct-00") == 1)
    asset = sim.balances("acct-00")[0]["asset"]
    sim.set_asset("acct-00", asset, negativeBalance="12.5")
    wait_until(
        lambda: (
            exporter.sample("binance_pm_negative_balance", account="acct-00", asset=asset) == 12.5
        )
    )
    sim.remove_asset("acct-00", asset)
    wait_until(
        lambda: (
            exporter.sample("binance_pm_negative_balance", account="acct-00", asset=asset) is None
        )
    )
    assert f'account="acct-00",asset="{asset}"' not in exporter.metrics_text()
    assert f'account="acct-01",asset="{asset}"' in exporter.metrics_text()


def test_a_failing_account_keeps_its_values_and_recovers(
    clock: EventClock, generated: list[GeneratedAccount]
) -> None:
    """On virtual time with the simulator in-process: one 500 on acct-01 turns its `up`
    to 0 and keeps its last values and last success; the other accounts stay up; its next
    try recovers, and the failure is counted once."""
    sim = Simulator([g.sim_account for g in generated], clock=clock, ip_weight_limit=60000)
    config = fast_config("http://sim.test", generated)
    running = Exporter(config, clock=clock, transport=SimTransport(sim.state, clock))
    pages: list[str] = []

    def up(name: str) -> bool:
        return running.store.get(name).up

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(running.run(stop))
        await clock.run_until(clock.now() + 5)
        pages.append(generate_latest(reference_registry(running)).decode())
        sim.inject_fault("status", account="acct-01", status=500, count=1)
        while up("acct-01"):
            await clock.advance()
        pages.append(generate_latest(reference_registry(running)).decode())
        while not up("acct-01"):
            await clock.advance()
        pages.append(generate_latest(reference_registry(running)).decode())
        stop.set()
        await clock.run(task)

    asyncio.run(go())
    before, down, after = pages
    for name in ("binance_pm_uni_mmr", "binance_pm_last_success_timestamp_seconds"):
        kept = metrics.sample(down, name, account="acct-01")
        assert kept is not None
        assert kept == metrics.sample(before, name, account="acct-01")
    assert metrics.sample(down, "binance_pm_up", account="acct-01") == 0
    assert metrics.sample(down, "binance_pm_up", account="acct-00") == 1
    assert metrics.sample(after, "binance_pm_up", account="acct-01") == 1
    failed = {"endpoint": "balance", "outcome": "server_error"}
    assert metrics.sample(after, "binance_pm_requests_total", **failed) == 1


def test_ten_accounts_refresh_round_robin_never_faster_than_the_budget(clock: EventClock) -> None:
    """The wiring of the budget into the exporter, on virtual time with the simulator
    in-process: B = 48000 x 0.25 = 12000/min and w = 40, so each of 10 accounts every
    2.0167 s and one refresh every 0.2017 s, whichever account, to the virtual microsecond."""
    interval = 2 * 60.5 / 60
    spacing = 40 * 60.5 / 12000  # between two refreshes, whichever account
    generated = accounts(10)
    names = [g.sim_account.name for g in generated]
    sim = Simulator([g.sim_account for g in generated], clock=clock, ip_weight_limit=48000)
    config = fast_config("http://sim.test", generated, ip_weight_limit_per_minute=48000, share=0.25)
    running = Exporter(config, clock=clock, transport=SimTransport(sim.state, clock))
    start = clock.now()

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(running.run(stop))
        await clock.run_until(start + 3 * interval)
        stop.set()
        await clock.run(task)

    asyncio.run(go())
    shown = generate_latest(reference_registry(running)).decode()
    for name in names:
        shown_interval = metrics.sample(shown, "binance_pm_refresh_interval_seconds", account=name)
        assert shown_interval == pytest.approx(interval)
    starts = _balance_times(sim)
    assert [a for _, a in starts[:30]] == names * 3  # round robin
    for (t0, _), (t1, _) in itertools.pairwise(starts):
        assert t1 - t0 == pytest.approx(spacing, abs=1e-6)
    for name in names:
        own = [t for t, a in starts if a == name]
        assert [b - a for a, b in itertools.pairwise(own)] == pytest.approx(
            [interval] * (len(own) - 1), abs=1e-6
        )
    assert [r for r in sim.requests if r.status in (418, 429)] == []


def _balance_times(sim: Simulator) -> list[tuple[float, str]]:
    return [(r.time, r.account or "") for r in sim.requests if r.path == "/papi/v1/balance"]


@loopback
def test_promtool_check_metrics_on_real_output(sim: Simulator, exporter: RunningExporter) -> None:
    wait_until(lambda: exporter.sample("binance_pm_up", account="acct-02") == 1)
    text = exporter.metrics_text()
    result = subprocess.run(
        [require("promtool"), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        check=False,
    )
    assert (result.stdout + result.stderr).decode() == ""
    assert result.returncode == 0


@loopback
def test_log_events_carry_account_endpoint_outcome_and_duration(
    sim: Simulator, generated: list[GeneratedAccount]
) -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    try:
        with RunningExporter(fast_config(sim.url, generated)) as running:
            wait_until(lambda: running.sample("binance_pm_up", account="acct-00") == 1)
            sim.inject_fault("status", endpoint="/papi/v1/account", account="acct-00", status=502)
            wait_until(lambda: running.sample("binance_pm_up", account="acct-00") == 0)
    finally:
        configure_logging("warning", "json")
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = next(e for e in events if e["event"] == "poll_failed")
    assert failed["level"] == "warning"
    assert failed["account"] == "acct-00"
    assert failed["endpoint"] == "account"
    assert failed["outcome"] == "server_error"
    assert failed["seconds"] >= 0
    requests = [e for e in events if e["event"] == "request" and e.get("account") == "acct-01"]
    assert {e["endpoint"] for e in requests} >= {"balance", "account"}
    assert all("seconds" in e and e["outcome"] == "success" for e in requests)
