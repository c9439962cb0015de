"""End to end with real servers on 127.0.0.1: simulator -> exporter -> Prometheus -> Alertmanager.

The stack (tests/support/e2estack.py) has 3 accounts refreshed every second. Prometheus
(Debian's `prometheus`) scrapes the exporter every second with prometheus/alerts.yml
loaded; Alertmanager (Debian's `prometheus-alertmanager`) sends to a webhook receiver
run by this test. The test runs every panel query of
every dashboard through Prometheus's HTTP API, then drives a negative balance in
the simulator to the webhook and back to resolved, and reports how long that took.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from support.dashboard_queries import label_values_variables, load_dashboards, queries, substitute
from support.e2estack import ALERT, JOB, STARTING, Stack, e2e_stack, returns_200
from support.waits import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

ACCOUNTS = 3
#: two desks with uniMMR thresholds of their own: market making runs close to the edge
#: (critical below 1.1, under the default 1.2), treasury pages early (below 1.6)
DESKS = {
    0: {
        "labels": {"desk": "mm", "team": "alpha"},
        "thresholds": {"uni_mmr_warning": 1.3, "uni_mmr_critical": 1.1},
    },
    1: {
        "labels": {"desk": "treasury"},
        "thresholds": {"uni_mmr_warning": 2.0, "uni_mmr_critical": 1.6},
    },
}
CRITICAL = "BinancePMUniMMRCritical"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A high IP limit lets the exporter refresh every account each second.
    budget = {"ip_weight_limit_per_minute": 60000, "min_interval_seconds": 1}
    work = tmp_path_factory.mktemp("e2e")
    # the margin collectors on: the Futures margin row's panels have data too
    margin = {"um_account": True, "cm_account": True}
    with e2e_stack(
        work, accounts=ACCOUNTS, budget=budget, account_settings=DESKS, collect=margin
    ) as result:
        try:
            wait_until(
                returns_200(result.http, f"{result.exporter_url}/readyz"),
                30,
                "exporter /readyz",
                step=0.2,
                ignoring=STARTING,
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n{result.logs()}") from None
        yield result


def _state_file(stack: Stack) -> str:
    found = list(Path(stack.processes[0].log.parent).glob("exporter-data/snapshot.json"))
    return found[0].read_text() if found else ""


def _scraped_values(stack: Stack) -> dict[str, str]:
    """Template variable values taken from what Prometheus scraped."""
    series = stack.promql(f'binance_pm_negative_balance{{job="{JOB}"}} == 0')
    labels = sorted((s["metric"] for s in series), key=lambda m: (m["account"], m["asset"]))
    first = labels[0]
    return {
        "datasource": "prometheus",
        "job": first["job"],
        "instance": first["instance"],
        "account": first["account"],
        "asset": first["asset"],
        "desk": ".*",  # the desk variable's All
    }


def _prometheus_has_samples(stack: Stack) -> bool:
    ready = [
        # every account refreshed and scraped
        f"count(binance_pm_up{{job='{JOB}'}} == 1) == {ACCOUNTS}",
        # recording rules evaluated
        "count(account:binance_pm_account_status:code) > 0",
        # counters have enough samples for rate() over $__rate_interval
        "count(rate(binance_pm_weight_spent_total[15s]) > 0) > 0",
        "count(rate(binance_pm_request_duration_seconds_count[15s]) > 0) > 0",
    ]
    return all(stack.promql(expr) for expr in ready)


def _wait_for_samples(stack: Stack) -> None:
    """Until every account is scraped, rules evaluated and rates computable (60 s at most)."""
    wait_until(
        lambda: _prometheus_has_samples(stack),
        60,
        "samples in Prometheus",
        step=0.2,
        ignoring=STARTING,
    )


# --- the tests --------------------------------------------------------------------


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    _wait_for_samples(stack)
    values = _scraped_values(stack)
    dashboards = load_dashboards()
    all_queries = [q for name, board in dashboards.items() for q in queries(name, board)]
    assert len(all_queries) > 40

    def run(q: Any) -> list[dict[str, Any]]:
        expr = substitute(q.expr, values)
        return stack.promql(expr) if q.instant else stack.promql_range(expr, seconds=30, step=1)

    # the exporter's own resources are among the panels' queries, and have data
    exprs = " ".join(q.expr for q in all_queries)
    for metric in ("process_resident_memory_bytes", "process_open_fds"):
        assert f"{metric}{{" in exprs, metric
        assert stack.promql(f'{metric}{{job="{JOB}"}} > 0'), metric
    # A test machine may run the exporter outside any cgroup memory limit: then the
    # limit's series is absent, as it is documented to be.
    no_limit = not stack.promql(f'binance_pm_exporter_memory_limit_bytes{{job="{JOB}"}}')
    all_queries = [
        q
        for q in all_queries
        if not (no_limit and q.expr.startswith("binance_pm_exporter_memory_limit_bytes{"))
    ]
    empty = [q for q in all_queries if not run(q)]
    if empty:  # give slow series (rates, latency quantiles) a few more scrapes
        wait_until(
            lambda: all(run(q) for q in empty),
            20,
            "data for " + ", ".join(f"{q.dashboard}:{q.panel}:{q.ref_id}" for q in empty),
            step=1,
            ignoring=STARTING,
        )

    for variable in (
        v for name, board in dashboards.items() for v in label_values_variables(name, board)
    ):
        response = stack.http.get(
            f"{stack.prometheus_url}/api/v1/series",
            params={"match[]": substitute(variable.selector, values)},
        )
        series = response.json()["data"]
        assert any(variable.label in s for s in series), f"{variable}: no values"


def _firing(stack: Stack) -> list[dict[str, str]]:
    """Labels of every alert Prometheus has firing."""
    response = stack.http.get(f"{stack.prometheus_url}/api/v1/alerts")
    return [a["labels"] for a in response.json()["data"]["alerts"] if a["state"] == "firing"]


def test_negative_balance_alert_reaches_webhook_and_resolves(
    stack: Stack, record_property: Callable[[str, object], None], capsys: pytest.CaptureFixture[str]
) -> None:
    _wait_for_samples(stack)
    values = _scraped_values(stack)
    account, asset = values["account"], values["asset"]
    labels = {"alertname": ALERT, "account": account, "asset": asset, "severity": "critical"}
    # The simulator's accounts are healthy (uniMMR far above 1.5, NORMAL, no debt):
    # no rule may fire on the real exporter's output before the negative balance.
    assert not _firing(stack), _firing(stack)

    started_at = time.monotonic()
    stack.set_asset(account, asset, negativeBalance="12.5")
    try:
        received_at, alert = stack.webhook.wait("firing", labels, timeout=45)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs()}") from None
    fired_after = received_at - started_at
    assert alert["labels"]["job"] == JOB
    assert alert["annotations"]["runbook_url"].endswith("#binancepmnegativebalance")
    assert account in alert["annotations"]["summary"]
    assert asset in alert["annotations"]["summary"]

    cleared_at = time.monotonic()
    stack.set_asset(account, asset, negativeBalance="0")
    try:
        # the rule keeps firing a while after the value clears (keep_firing_for: restarts)
        resolved_at, _ = stack.webhook.wait("resolved", labels, timeout=45 + 10)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs()}") from None
    resolved_after = resolved_at - cleared_at

    record_property("negative_balance_to_webhook_seconds", round(fired_after, 3))
    record_property("cleared_to_resolved_webhook_seconds", round(resolved_after, 3))
    with capsys.disabled():
        print(
            f"\nnegative balance -> webhook (firing): {fired_after:.2f} s; "
            f"cleared -> webhook (resolved): {resolved_after:.2f} s"
        )


def _panel_query(dashboard: str, title: str) -> str:
    """The (only) query of the panel `title` of `dashboard`."""
    board = load_dashboards()[dashboard]
    (query,) = [q for q in queries(dashboard, board) if q.panel == title]
    return query.expr


def test_usd_total_and_a_large_negative_balance_page_with_its_dollar_figure(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    _wait_for_samples(stack)
    values = _scraped_values(stack)
    wait_until(
        lambda: len(stack.promql(f'account:binance_pm_net_usd:sum{{job="{JOB}"}}')) == ACCOUNTS,
        30,
        "USD totals recorded",
        step=0.2,
        ignoring=STARTING,
    )
    # The Overview's grand total, as Grafana would ask for it: the simulator prices its
    # assets consistently, so it is the sum of the accounts' actualEquity (1e-6).
    # (waited for: the recording rules may lag the last scrape by one evaluation)
    grand_total = substitute(_panel_query("overview.json", "Net, all accounts"), values)
    seen: list[tuple[float, float]] = []

    def totals_agree() -> bool:
        net = stack.promql(grand_total)
        equity = stack.promql(f'sum(binance_pm_actual_equity_usd{{job="{JOB}"}})')
        seen.append((float(net[0]["value"][1]), float(equity[0]["value"][1])))
        return seen[-1][0] == pytest.approx(seen[-1][1], rel=1e-6)

    try:
        wait_until(totals_agree, 15, "net USD = sum of actualEquity", step=0.2, ignoring=STARTING)
    except AssertionError as error:
        raise AssertionError(f"{error}: (net, equity) {seen[-3:]}") from None
    total = seen[-1][0]
    assert total > 0

    # 0.2 BTC owed at the simulator's 65000 USD: 13000 USD, over the 10000 USD threshold.
    account = values["account"]
    labels = {"alertname": "BinancePMNegativeBalanceLarge", "account": account}
    stack.set_asset(account, "BTC", negativeBalance="0.2")
    try:
        _, alert = stack.webhook.wait("firing", {**labels, "severity": "critical"}, timeout=45)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs()}") from None
    # The per-asset alert fires too, its USD value in its description (read from Prometheus:
    # the webhook's queue may have passed it while waiting for the page).
    small = wait_until(
        lambda: next(
            (
                a
                for a in stack.http.get(f"{stack.prometheus_url}/api/v1/alerts").json()["data"][
                    "alerts"
                ]
                if a["labels"]["alertname"] == ALERT and a["labels"].get("asset") == "BTC"
            ),
            None,
        ),
        30,
        "BinancePMNegativeBalance on BTC",
        step=0.2,
        ignoring=STARTING,
    )
    assert "13000.00 USD" in alert["annotations"]["summary"]
    assert "worth 13000.00 USD" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"].endswith("#binancepmnegativebalancelarge")
    assert "Worth 13000.00 USD" in small["annotations"]["description"]

    stack.set_asset(account, "BTC", negativeBalance="0")
    try:
        stack.webhook.wait("resolved", labels, timeout=45)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs()}") from None
    wait_until(lambda: not _firing(stack), 30, "no alert firing", step=0.2, ignoring=STARTING)
    with capsys.disabled():
        print(f"\nnet USD of all accounts: {total:.2f}; page: {alert['annotations']['summary']}")


def _raw_samples(stack: Stack, selector: str, seconds: int) -> list[float]:
    """The times of the samples Prometheus stored for one series in the last `seconds`."""
    (series,) = stack.promql(f"{selector}[{seconds}s]")
    return [float(t) for t, _ in series["values"]]


def test_a_restart_with_storage_neither_resolves_nor_refires_a_firing_alert(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    _wait_for_samples(stack)
    series = stack.promql(f'binance_pm_negative_balance{{job="{JOB}"}} == 0')
    last = max((s["metric"] for s in series), key=lambda m: (m["account"], m["asset"]))
    account, asset = last["account"], last["asset"]
    labels = {"alertname": ALERT, "account": account, "asset": asset}
    stack.set_asset(account, asset, negativeBalance="3.25")
    try:
        stack.webhook.wait("firing", labels, timeout=45)
        # the exporter's state file holds the negative balance (written every 5 s)
        wait_until(
            lambda: '"negativeBalance":3.25' in _state_file(stack),
            20,
            "the negative balance in the state file",
            step=0.2,
            ignoring=STARTING,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs()}") from None

    restart_began = time.monotonic()
    stack.restart_exporter()
    wait_until(
        returns_200(stack.http, f"{stack.exporter_url}/readyz"),
        30,
        "the exporter ready again",
        step=0.2,
        ignoring=STARTING,
    )
    restart_seconds = time.monotonic() - restart_began
    # The assertion is that nothing arrives: watch for 10 s, ten scrapes and rule
    # evaluations and Alertmanager flushes (group_interval 1 s) after the restart.
    settle = 10.0
    time.sleep(settle)

    after: list[dict[str, Any]] = []
    while not stack.webhook.alerts.empty():
        received, alert = stack.webhook.alerts.get_nowait()
        if received >= restart_began and labels.items() <= alert["labels"].items():
            after.append(alert)
    assert after == [], [a["status"] for a in after]
    assert labels.items() <= {k: v for a in _firing(stack) for k, v in a.items()}.items()

    selector = f'binance_pm_negative_balance{{job="{JOB}",account="{account}",asset="{asset}"}}'
    times = _raw_samples(stack, selector, int(restart_seconds + settle + 10))
    gap = max(b - a for a, b in itertools.pairwise(times))
    scrape_interval = 1.0
    with capsys.disabled():
        print(f"\nrestart: {restart_seconds:.2f} s; longest gap in the series: {gap:.2f} s")
    # Scrapes come every interval: the k scrapes that failed lie within the restart, so
    # k <= restart / interval + 1, and the gap (k + 1 intervals) is at most one interval
    # plus the restart time rounded up to whole intervals.
    missed_at_most = math.floor(restart_seconds / scrape_interval) + 1
    # (+ 0.25 s: a scrape that starts late on a loaded machine)
    assert gap <= scrape_interval * (1 + missed_at_most) + 0.25, (gap, restart_seconds)
    stack.set_asset(account, asset, negativeBalance="0")


# --- an account's own threshold and labels ------------------------------------------


def _set_uni_mmr(stack: Stack, account: str, uni_mmr: float) -> None:
    """Serve the account's GET /papi/v1/account with this uniMMR, its equity unchanged."""

    def current(metric: str) -> float:
        (series,) = stack.promql(f'{metric}{{job="{JOB}",account="{account}"}}')
        return float(series["value"][1])

    equity, actual = (
        current("binance_pm_account_equity_usd"),
        current("binance_pm_actual_equity_usd"),
    )
    maint = equity / uni_mmr
    stack.set_account_info(
        account,
        {
            "uniMMR": f"{uni_mmr}",
            "accountEquity": f"{equity}",
            "actualEquity": f"{actual}",
            "accountInitialMargin": f"{maint / 0.4}",
            "accountMaintMargin": f"{maint}",
            "accountStatus": "NORMAL",
            "virtualMaxWithdrawAmount": "0",
            "totalAvailableBalance": f"{equity - maint / 0.4}",
            "totalMarginOpenLoss": "0",
            "updateTime": int(time.time() * 1000),
        },
    )


def _risk_group_evaluated_after(stack: Stack, moment: float) -> bool:
    """Whether Prometheus has evaluated the account-risk rules twice since `moment`."""
    response = stack.http.get(f"{stack.prometheus_url}/api/v1/rules", params={"type": "alert"})
    (group,) = [
        g for g in response.json()["data"]["groups"] if g["name"] == "binance-pm-account-risk"
    ]
    last = datetime.fromisoformat(group["lastEvaluation"]).timestamp()
    return last > moment + 2


def test_an_account_pages_below_its_own_threshold_and_carries_its_desk(stack: Stack) -> None:
    """Two accounts of two desks: treasury below its own critical 1.6 (above the default
    1.2) pages with desk="treasury"; mm below the default 1.2 but above its own 1.1 does
    not. Last in the file: it replaces what the simulator serves for their risk."""
    _wait_for_samples(stack)
    mm, treasury = stack.accounts[0], stack.accounts[1]
    info = stack.promql(f'binance_pm_account_info{{job="{JOB}"}}')
    assert {s["metric"]["account"]: s["metric"].get("desk") for s in info} == {
        mm: "mm",
        treasury: "treasury",
        stack.accounts[2]: None,
    }
    thresholds = stack.promql(f'binance_pm_account_threshold{{job="{JOB}"}}')
    assert len(thresholds) == 4
    # (the test before may leave its negative balance firing a while: keep_firing_for)
    assert not [a for a in _firing(stack) if a.get("account") in (mm, treasury)], _firing(stack)

    _set_uni_mmr(stack, mm, 1.15)
    _set_uni_mmr(stack, treasury, 1.5)
    labels = {"alertname": CRITICAL, "account": treasury, "severity": "critical"}
    try:
        _, alert = stack.webhook.wait("firing", labels, timeout=45)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs()}") from None
    assert alert["labels"]["desk"] == "treasury"
    assert "team" not in alert["labels"]
    assert alert["annotations"]["summary"] == (
        f"uniMMR of Binance PM account {treasury} is 1.500, below 1.6"
    )

    # mm's 1.15 is in Prometheus, and the rules have seen it: no alert for mm.
    seen = wait_until(
        lambda: stack.promql(f'timestamp(binance_pm_uni_mmr{{job="{JOB}",account="{mm}"}} < 1.2)'),
        30,
        "mm's uniMMR of 1.15 scraped",
        step=0.2,
        ignoring=STARTING,
    )
    since = float(seen[0]["value"][1])
    wait_until(
        lambda: _risk_group_evaluated_after(stack, since),
        30,
        "two rule evaluations",
        step=0.2,
        ignoring=STARTING,
    )
    assert not [a for a in _firing(stack) if a.get("account") == mm], _firing(stack)
    _set_uni_mmr(stack, treasury, 50.0)
    _set_uni_mmr(stack, mm, 50.0)
