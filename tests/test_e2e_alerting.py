"""End to end with real servers on 127.0.0.1: simulator -> exporter -> Prometheus -> Alertmanager.

Prometheus (Debian's `prometheus`) scrapes the exporter every second with
prometheus/alerts.yml loaded; Alertmanager (Debian's `prometheus-alertmanager`)
sends to a webhook receiver run by this test. The test runs every panel query of
every dashboard through Prometheus's HTTP API, then drives a negative balance in
the simulator to the webhook and back to resolved, and reports how long that took.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import queue
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from dashboard_queries import ROOT, label_values_variables, load_dashboards, queries, substitute

pytestmark = pytest.mark.timeout(400)

ACCOUNTS = 3
ASSETS = 4
JOB = "binance-pm-exporter"
ALERT = "BinancePMNegativeBalance"
T = TypeVar("T")


# --- helpers --------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], T | None], timeout: float, poll: float = 0.2) -> T:
    """Call check() until it returns something other than None or False, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as error:
            last_error, result = error, None
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {last_error!r}")
        time.sleep(poll)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} (exit {self.popen.poll()}) ---\n" + "\n".join(
            text.splitlines()[-lines:]
        )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@contextlib.contextmanager
def started(
    name: str, args: list[str], workdir: Path, *, stdout_pipe: bool = False
) -> Iterator[Process]:
    log = workdir / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as log_file:
        popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log_file,
            stderr=log_file,
        )
    process = Process(name, popen, log)
    try:
        yield process
    finally:
        process.stop()


def read_line(process: Process, timeout: float) -> str:
    """The first stdout line of a process started with stdout_pipe, within the deadline."""
    stream = process.popen.stdout
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output from {process.name} within {timeout} s\n{process.tail()}"
    return stream.readline().decode().strip()


@dataclass
class Webhook:
    """Alertmanager webhook receiver: every alert received, with the time it arrived."""

    url: str
    alerts: queue.Queue[tuple[float, dict[str, Any]]] = field(default_factory=queue.Queue)

    def wait(self, status: str, labels: dict[str, str], timeout: float) -> tuple[float, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                received, alert = self.alerts.get(timeout=left)
            except queue.Empty:
                break
            if alert["status"] == status and labels.items() <= alert["labels"].items():
                return received, alert
        raise AssertionError(f"no {status} alert {labels} at the webhook within {timeout} s")


@contextlib.contextmanager
def webhook_receiver() -> Iterator[Webhook]:
    received: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            now = time.monotonic()
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            for alert in json.loads(body)["alerts"]:
                received.put((now, alert))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Webhook(f"http://127.0.0.1:{server.server_address[1]}/alerts", received)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class Stack:
    sim_url: str
    exporter_url: str
    prometheus_url: str
    alertmanager_url: str
    webhook: Webhook
    processes: list[Process]
    http: httpx.Client
    #: stops the exporter (SIGTERM, as a rollout does) and starts it again, same flags
    restart_exporter: Callable[[], None]

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def promql(self, expr: str) -> list[dict[str, Any]]:
        response = self.http.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr})
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def promql_range(self, expr: str, seconds: int = 60, step: int = 5) -> list[dict[str, Any]]:
        end = time.time()
        response = self.http.get(
            f"{self.prometheus_url}/api/v1/query_range",
            params={"query": expr, "start": end - seconds, "end": end, "step": step},
        )
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


# --- the stack --------------------------------------------------------------------


def _alertmanager_config(webhook_url: str) -> dict[str, Any]:
    return {
        "route": {
            "receiver": "webhook",
            "group_by": ["alertname", "account", "asset"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {"name": "webhook", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}
        ],
    }


#: the shipped rules' keep_firing_for (2m, BinancePMExporterDown's `for` at a 15-60 s scrape
#: interval), scaled to this stack's 1 s scrapes: it still spans an exporter restart
KEEP_FIRING_FOR = "10s"


def _rules(work: Path) -> Path:
    """The shipped alerts.yml, keep_firing_for scaled to the 1 s scrape interval."""
    text = (ROOT / "prometheus" / "alerts.yml").read_text()
    assert "keep_firing_for: 2m" in text
    rules = work / "alerts.yml"
    rules.write_text(text.replace("keep_firing_for: 2m", f"keep_firing_for: {KEEP_FIRING_FOR}"))
    return rules


def _prometheus_config(exporter: str, alertmanager: str, rules: Path) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [exporter]}]}],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = shutil.which("prometheus")
    alertmanager = shutil.which("prometheus-alertmanager")
    assert prometheus, "prometheus not on PATH: install Debian's prometheus package"
    assert alertmanager, "prometheus-alertmanager not on PATH: install Debian's package"
    work = tmp_path_factory.mktemp("e2e")
    config_path = work / "exporter.yaml"
    exporter_addr, am_addr, prom_addr = (f"127.0.0.1:{free_port()}" for _ in range(3))
    # A high IP limit lets the exporter refresh every account each second.
    sim_args = ["--listen", "127.0.0.1:0", "--accounts", str(ACCOUNTS), "--assets", str(ASSETS)]
    sim_args += ["--ip-weight-limit", "60000", "--write-config", str(config_path)]

    with contextlib.ExitStack() as on_exit, httpx.Client(timeout=5) as http:
        webhook = on_exit.enter_context(webhook_receiver())
        sim = on_exit.enter_context(
            started(
                "simulator",
                [sys.executable, "-m", "exporter.simulator", *sim_args],
                work,
                stdout_pipe=True,
            )
        )
        processes = [sim]
        line = read_line(sim, timeout=20)
        assert line.startswith("simulator listening on http://"), line + sim.tail()
        sim_url = line.rsplit(" ", 1)[1]

        config = yaml.safe_load(config_path.read_text())
        config.setdefault("budget", {})["min_interval_seconds"] = 1
        config_path.write_text(yaml.safe_dump(config))
        exporter_args = ["--config.file", str(config_path), "--web.listen-address", exporter_addr]
        exporter_args += ["--storage.path", str(work / "exporter-data")]
        exporter_command = [sys.executable, "-m", "exporter", *exporter_args]
        processes.append(on_exit.enter_context(started("exporter", exporter_command, work)))

        def restart_exporter() -> None:
            index = next(i for i, p in enumerate(processes) if p.name == "exporter")
            processes[index].stop()
            processes[index] = on_exit.enter_context(started("exporter", exporter_command, work))

        am_config = work / "alertmanager.yml"
        am_config.write_text(yaml.safe_dump(_alertmanager_config(webhook.url)))
        am_args = [
            f"--config.file={am_config}",
            f"--storage.path={work / 'alertmanager-data'}",
            f"--web.listen-address={am_addr}",
            "--cluster.listen-address=",
        ]
        processes.append(
            on_exit.enter_context(started("alertmanager", [alertmanager, *am_args], work))
        )

        prom_config = work / "prometheus.yml"
        prom_config.write_text(
            yaml.safe_dump(_prometheus_config(exporter_addr, am_addr, _rules(work)))
        )
        prom_args = [
            f"--config.file={prom_config}",
            f"--storage.tsdb.path={work / 'prometheus-data'}",
            f"--web.listen-address={prom_addr}",
        ]
        processes.append(
            on_exit.enter_context(started("prometheus", [prometheus, *prom_args], work))
        )

        result = Stack(
            sim_url,
            f"http://{exporter_addr}",
            f"http://{prom_addr}",
            f"http://{am_addr}",
            webhook,
            processes,
            http,
            restart_exporter,
        )
        for name, url in (
            ("exporter /readyz", f"{result.exporter_url}/readyz"),
            ("alertmanager /-/ready", f"{result.alertmanager_url}/-/ready"),
            ("prometheus /-/ready", f"{result.prometheus_url}/-/ready"),
        ):
            try:
                wait_for(name, _returns_200(http, url), timeout=30)
            except AssertionError as error:
                raise AssertionError(f"{error}\n{result.logs()}") from None
        yield result


def _state_file(stack: Stack) -> str:
    found = list(Path(stack.processes[0].log.parent).glob("exporter-data/snapshot.json"))
    return found[0].read_text() if found else ""


def _returns_200(http: httpx.Client, url: str) -> Callable[[], bool]:
    return lambda: http.get(url).status_code == 200


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


# --- the tests --------------------------------------------------------------------


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    wait_for("samples in Prometheus", lambda: _prometheus_has_samples(stack), timeout=60)
    values = _scraped_values(stack)
    dashboards = load_dashboards()
    all_queries = [q for name, board in dashboards.items() for q in queries(name, board)]
    assert len(all_queries) > 40

    def run(q: Any) -> list[dict[str, Any]]:
        expr = substitute(q.expr, values)
        return stack.promql(expr) if q.instant else stack.promql_range(expr, seconds=30, step=1)

    empty = [q for q in all_queries if not run(q)]
    if empty:  # give slow series (rates, latency quantiles) a few more scrapes
        wait_for(
            "data for " + ", ".join(f"{q.dashboard}:{q.panel}:{q.ref_id}" for q in empty),
            lambda: all(run(q) for q in empty),
            timeout=20,
            poll=1,
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
    wait_for("samples in Prometheus", lambda: _prometheus_has_samples(stack), timeout=60)
    values = _scraped_values(stack)
    account, asset = values["account"], values["asset"]
    labels = {"alertname": ALERT, "account": account, "asset": asset, "severity": "critical"}
    # The simulator's accounts are healthy (uniMMR far above 1.5, NORMAL, no debt):
    # no rule may fire on the real exporter's output before the negative balance.
    assert not _firing(stack), _firing(stack)

    patch_url = f"{stack.sim_url}/_sim/assets/{account}/{asset}"
    started_at = time.monotonic()
    response = stack.http.patch(patch_url, json={"negativeBalance": "12.5"})
    assert response.status_code < 300, response.text
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
    response = stack.http.patch(patch_url, json={"negativeBalance": "0"})
    assert response.status_code < 300, response.text
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
    wait_for("samples in Prometheus", lambda: _prometheus_has_samples(stack), timeout=60)
    values = _scraped_values(stack)
    wait_for(
        "USD totals recorded",
        lambda: len(stack.promql(f'account:binance_pm_net_usd:sum{{job="{JOB}"}}')) == ACCOUNTS,
        timeout=30,
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
        wait_for("net USD = sum of actualEquity", totals_agree, timeout=15)
    except AssertionError as error:
        raise AssertionError(f"{error}: (net, equity) {seen[-3:]}") from None
    total = seen[-1][0]
    assert total > 0

    # 0.2 BTC owed at the simulator's 65000 USD: 13000 USD, over the 10000 USD threshold.
    account = values["account"]
    labels = {"alertname": "BinancePMNegativeBalanceLarge", "account": account}
    patch_url = f"{stack.sim_url}/_sim/assets/{account}/BTC"
    response = stack.http.patch(patch_url, json={"negativeBalance": "0.2"})
    assert response.status_code < 300, response.text
    try:
        _, alert = stack.webhook.wait("firing", {**labels, "severity": "critical"}, timeout=45)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs()}") from None
    # The per-asset alert fires too, its USD value in its description (read from Prometheus:
    # the webhook's queue may have passed it while waiting for the page).
    small = wait_for(
        "BinancePMNegativeBalance on BTC",
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
        timeout=30,
    )
    assert "13000.00 USD" in alert["annotations"]["summary"]
    assert "worth 13000.00 USD" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"].endswith("#binancepmnegativebalancelarge")
    assert "Worth 13000.00 USD" in small["annotations"]["description"]

    response = stack.http.patch(patch_url, json={"negativeBalance": "0"})
    assert response.status_code < 300, response.text
    try:
        stack.webhook.wait("resolved", labels, timeout=45)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs()}") from None
    wait_for("no alert firing", lambda: not _firing(stack), timeout=30)
    with capsys.disabled():
        print(f"\nnet USD of all accounts: {total:.2f}; page: {alert['annotations']['summary']}")


def _raw_samples(stack: Stack, selector: str, seconds: int) -> list[float]:
    """The times of the samples Prometheus stored for one series in the last `seconds`."""
    (series,) = stack.promql(f"{selector}[{seconds}s]")
    return [float(t) for t, _ in series["values"]]


def test_a_restart_with_storage_neither_resolves_nor_refires_a_firing_alert(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("samples in Prometheus", lambda: _prometheus_has_samples(stack), timeout=60)
    series = stack.promql(f'binance_pm_negative_balance{{job="{JOB}"}} == 0')
    last = max((s["metric"] for s in series), key=lambda m: (m["account"], m["asset"]))
    account, asset = last["account"], last["asset"]
    labels = {"alertname": ALERT, "account": account, "asset": asset}
    patch_url = f"{stack.sim_url}/_sim/assets/{account}/{asset}"
    response = stack.http.patch(patch_url, json={"negativeBalance": "3.25"})
    assert response.status_code < 300, response.text
    try:
        stack.webhook.wait("firing", labels, timeout=45)
        # the exporter's state file holds the negative balance (written every 5 s)
        wait_for(
            "the negative balance in the state file",
            lambda: '"negativeBalance":3.25' in _state_file(stack),
            timeout=20,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs()}") from None

    restart_began = time.monotonic()
    stack.restart_exporter()
    wait_for(
        "the exporter ready again", _returns_200(stack.http, f"{stack.exporter_url}/readyz"), 30
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
    stack.http.patch(patch_url, json={"negativeBalance": "0"})
