"""The whole exporter against the simulator over loopback HTTP: issue 2 end to end."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import pytest
from support.harness import RunningExporter, accounts, fast_config
from support.systools import require
from support.waits import wait_until

import exporter
from exporter.logs import configure_logging
from exporter.simulator import Simulator
from exporter.simulator.demo import GeneratedAccount

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures"


def test_seed_page_values_reach_metrics_for_every_key_type(
    sim: Simulator, generated: list[GeneratedAccount]
) -> None:
    seed = json.loads((FIXTURES / "balance_seed.json").read_text())
    info = json.loads((FIXTURES / "account_seed.json").read_text())
    for g in generated:
        sim.set_balances(g.sim_account.name, seed)
        sim.set_account_info(g.sim_account.name, info)
    with RunningExporter(fast_config(sim.url, generated)) as running:
        for name in ("acct-00", "acct-01", "acct-02"):  # hmac, ed25519, rsa
            wait_until(lambda n=name: running.sample("binance_pm_up", account=n) == 1)
            labels = {"account": name, "asset": "USDT"}
            assert running.sample("binance_pm_wallet_balance", **labels) == 122607.35137903
            assert running.sample("binance_pm_cross_margin_asset", **labels) == 92.27530794
            assert running.sample("binance_pm_cross_margin_interest", **labels) == 0.72469206
            assert running.sample("binance_pm_cm_unrealized_pnl", **labels) is None  # ""
            assert running.sample("binance_pm_negative_balance", **labels) == 0
            assert running.sample("binance_pm_uni_mmr", account=name) == 5167.92171923
            assert running.sample("binance_pm_account_status", account=name, status="NORMAL") == 1
        assert running.sample("binance_pm_exporter_build_info", version=exporter.__version__) == 1
        assert sum(r.status == 429 for r in sim.requests) == 0


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
    sim: Simulator, exporter: RunningExporter
) -> None:
    wait_until(lambda: exporter.sample("binance_pm_up", account="acct-01") == 1)
    before = exporter.sample("binance_pm_uni_mmr", account="acct-01")
    last = exporter.sample("binance_pm_last_success_timestamp_seconds", account="acct-01")
    sim.inject_fault("status", account="acct-01", status=500, count=1)
    wait_until(lambda: exporter.sample("binance_pm_up", account="acct-01") == 0)
    assert exporter.sample("binance_pm_uni_mmr", account="acct-01") == before
    assert exporter.sample("binance_pm_last_success_timestamp_seconds", account="acct-01") == last
    assert exporter.sample("binance_pm_up", account="acct-00") == 1
    wait_until(lambda: exporter.sample("binance_pm_up", account="acct-01") == 1)
    assert (
        exporter.sample("binance_pm_requests_total", endpoint="balance", outcome="server_error")
        == 1
    )


def test_ten_accounts_refresh_round_robin_never_faster_than_the_budget() -> None:
    """The pace itself is asserted on virtual time (test_poller); here, the wiring. A loaded
    machine can only delay requests, so what holds is a bound: the k-th refresh cannot
    reach the simulator before k reservations of w = 40 at B = 12000 per 60.5 s."""
    interval = 2 * 60.5 / 60  # B = 48000 x 0.25 = 12000/min, w = 40: each of 10 every 2 s
    spacing = 40 * 60.5 / 12000  # between two refreshes, whichever account
    generated = accounts(10)
    with Simulator([g.sim_account for g in generated], ip_weight_limit=48000) as sim:
        config = fast_config(sim.url, generated, ip_weight_limit_per_minute=48000, share=0.25)
        started = time.time()
        with RunningExporter(config) as running:
            assert running.sample("binance_pm_refresh_interval_seconds", account="acct-00") == (
                pytest.approx(interval)
            )
            names = [g.sim_account.name for g in generated]

            def three_each() -> bool:
                refreshed = [a for _, a in _balance_times(sim)]
                return all(refreshed.count(name) >= 3 for name in names)

            wait_until(three_each, timeout=60, what="three refreshes of every account")
        starts = sorted(_balance_times(sim))  # by arrival
    for k, (t, _) in enumerate(starts):
        assert t >= started + k * spacing, k
    for name in names:
        own = [t for t, a in starts if a == name]
        assert all(t >= started + j * interval for j, t in enumerate(own)), name
    assert [r for r in sim.requests if r.status in (418, 429)] == []


def _balance_times(sim: Simulator) -> list[tuple[float, str]]:
    return [(r.time, r.account or "") for r in sim.requests if r.path == "/papi/v1/balance"]


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
