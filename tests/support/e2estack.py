"""The end-to-end stack on 127.0.0.1: simulator -> exporter -> Prometheus -> Alertmanager
-> a webhook receiver that records when each alert arrives.

Prometheus (Debian's `prometheus`) scrapes the exporter every second with
prometheus/alerts.yml loaded; Alertmanager (Debian's `prometheus-alertmanager`)
sends to the webhook. Shared by tests/test_e2e_alerting.py (3 accounts refreshed every
second), tests/test_e2e_stream.py and bench/page_time.py (200 accounts on the default
budget, streams on or off), so the page they time is the one the alerting test proves.
No pytest in here: the bench runs it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from support import metrics
from support.dashboard_queries import ROOT
from support.ports import free_port
from support.systools import require
from support.waits import wait_until

JOB = "binance-pm-exporter"
ALERT = "BinancePMNegativeBalance"


# --- helpers --------------------------------------------------------------------


#: what a server still starting answers: no connection, an error status, half a JSON body
STARTING = (httpx.HTTPError, OSError, ValueError, KeyError)


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

    def first_firing(self, alertname: str, accounts: set[str], timeout: float) -> dict[str, float]:
        """When `alertname` first arrived firing for each of `accounts` (monotonic time);
        accounts it did not reach within the timeout are left out. Other alerts are
        consumed and dropped."""
        arrived: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while arrived.keys() < accounts and (left := deadline - time.monotonic()) > 0:
            try:
                received, alert = self.alerts.get(timeout=left)
            except queue.Empty:
                break
            labels = alert["labels"]
            if alert["status"] == "firing" and labels.get("alertname") == alertname:
                account = labels.get("account", "")
                if account in accounts:
                    arrived.setdefault(account, received)
        return arrived


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
    #: the exporter's account names, as its config gives them
    accounts: list[str]

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

    def set_account_info(self, account: str, info: dict[str, Any]) -> None:
        """Replace what the simulator serves as the account's GET /papi/v1/account."""
        response = self.http.put(f"{self.sim_url}/_sim/account/{account}", json=info)
        assert response.status_code < 300, response.text

    def set_asset(self, account: str, asset: str, **fields: str) -> None:
        """Change one asset of one account in the simulator (its stream says so)."""
        response = self.http.patch(f"{self.sim_url}/_sim/assets/{account}/{asset}", json=fields)
        assert response.status_code < 300, response.text

    def scrape(self) -> str:
        """The exporter's /metrics, as text."""
        return self.http.get(f"{self.exporter_url}/metrics").text

    def streams_up(self) -> bool:
        """Every account's user data stream open, as the exporter's /metrics says."""
        text = self.scrape()
        return all(f'binance_pm_stream_up{{account="{a}"}} 1.0' in text for a in self.accounts)


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


def _exporter_config(
    path: Path,
    budget: dict[str, Any],
    stream: bool,
    settings: dict[int, dict[str, Any]],
    collect: dict[str, Any] | None = None,
) -> list[str]:
    """Apply `budget`, `stream` and each account's `settings` (by its index: labels,
    thresholds) to the config the simulator wrote (which turns the streams on at its own
    URL); the account names."""
    config = yaml.safe_load(path.read_text())
    config.setdefault("budget", {}).update(budget)
    for index, extra in settings.items():
        config["accounts"][index].update(extra)
    if not stream:
        config["stream"] = {"enabled": False}
    if collect is not None:
        config["collect"] = collect
    path.write_text(yaml.safe_dump(config))
    return [account["name"] for account in config["accounts"]]


@contextlib.contextmanager
def e2e_stack(
    work: Path,
    *,
    accounts: int,
    assets: int = 4,
    budget: dict[str, Any] | None = None,
    stream: bool = True,
    account_settings: dict[int, dict[str, Any]] | None = None,
    trade_rate: float = 0.0,
    collect: dict[str, Any] | None = None,
) -> Iterator[Stack]:
    """The whole stack in `work`, yielded once every server answers (the exporter has
    not necessarily refreshed any account yet). `budget` overrides the exporter's budget
    keys; its `ip_weight_limit_per_minute` is the simulator's limit too (otherwise both
    keep the simulator's default, which the exporter's default budget fits).
    `account_settings` adds keys (labels, thresholds) to the accounts, by index. With
    `trade_rate`, the simulator's desk trades that many fills a second (`--trade-rate`).
    `collect` is the exporter's `collect:` section (e.g. the margin collectors on)."""
    budget = budget or {}
    prometheus = require("prometheus")
    alertmanager = require("prometheus-alertmanager")
    config_path = work / "exporter.yaml"
    exporter_addr, am_addr, prom_addr = (f"127.0.0.1:{free_port()}" for _ in range(3))
    sim_args = ["--listen", "127.0.0.1:0", "--accounts", str(accounts), "--assets", str(assets)]
    sim_args += ["--write-config", str(config_path)]
    if trade_rate:
        sim_args += ["--trade-rate", str(trade_rate)]
    if "ip_weight_limit_per_minute" in budget:
        sim_args += ["--ip-weight-limit", str(budget["ip_weight_limit_per_minute"])]

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

        names = _exporter_config(config_path, budget, stream, account_settings or {}, collect)
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
            names,
        )
        for name, url in (
            ("exporter /healthz", f"{result.exporter_url}/healthz"),
            ("alertmanager /-/ready", f"{result.alertmanager_url}/-/ready"),
            ("prometheus /-/ready", f"{result.prometheus_url}/-/ready"),
        ):
            try:
                wait_until(returns_200(http, url), 30, name, step=0.2, ignoring=STARTING)
            except AssertionError as error:
                raise AssertionError(f"{error}\n{result.logs()}") from None
        yield result


def returns_200(http: httpx.Client, url: str) -> Callable[[], bool]:
    return lambda: http.get(url).status_code == 200


# --- page times -------------------------------------------------------------------

#: the asset a page is timed on: in every simulated account (and added where it is not)
PAGE_ASSET = "USDT"


@dataclass(frozen=True)
class Page:
    """One try: seconds from the change in the simulator to the exporter's /metrics
    showing it (`shown`), and to its page at the webhook (`paged`)."""

    shown: float
    paged: float


#: how often a try looks at /metrics: the shown time's resolution
SHOWN_STEP = 0.1


def page_times(
    stack: Stack, accounts: list[str], pause: Callable[[], float], timeout: float
) -> list[Page]:
    """One try per account, in turn: a negative balance set in the simulator, and the
    seconds until /metrics shows it and until its firing `BinancePMNegativeBalance`
    arrives at the webhook (timed by the receiver's thread as it arrives, so looking at
    /metrics meanwhile delays no page). Between tries, `pause()` seconds after the
    previous page arrived: triggered refreshes are paid from half the budget, so tries
    faster than that would time the queue rather than the page; and a try started the
    moment a page arrives would start in step with Prometheus's and Alertmanager's 1 s
    ticks, always at the same point in them. Accounts must be distinct (an alert already
    firing does not page again)."""
    pages: list[Page] = []
    for index, account in enumerate(accounts):
        if index:
            time.sleep(pause())  # real: the desk trades over real sockets meanwhile
        changed = time.monotonic()
        stack.set_asset(account, PAGE_ASSET, negativeBalance="12.5")
        labels = {"account": account, "asset": PAGE_ASSET}
        try:
            wait_until(
                lambda labels=labels: (
                    metrics.sample(stack.scrape(), "binance_pm_negative_balance", **labels) == 12.5
                ),
                timeout,
                f"the negative balance of {account} on /metrics",
                step=SHOWN_STEP,
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n{stack.logs()}") from None
        shown = time.monotonic() - changed
        arrived = stack.webhook.first_firing(ALERT, {account}, timeout)
        if account not in arrived:
            raise AssertionError(f"no {ALERT} for {account} within {timeout} s\n{stack.logs()}")
        pages.append(Page(shown, arrived[account] - changed))
    return pages
