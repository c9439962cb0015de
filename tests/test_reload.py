"""Reload on SIGHUP, against the real exporter process: the new config runs, or the old one
keeps running; unchanged accounts lose nothing."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.exporterproc import ExporterProcess, running
from support.faultkit import hmac_accounts
from support.harness import RunningExporter, fast_config
from support.waits import wait_until

from exporter.app import Exporter
from exporter.config import Config, ConfigError, load_config
from exporter.shard import owner
from exporter.simulator import Simulator
from exporter.simulator.transport import SimTransport
from exporter.simulator.virtualtime import EventClock

pytestmark = pytest.mark.timeout(180)
#: the exporter in wall time: a process of its own (SIGHUP, /-/reload), or in a thread
wall_time = pytest.mark.slow

RELOADED = "binance_pm_config_last_reload_success_timestamp_seconds"
SUCCESSFUL = "binance_pm_config_last_reload_successful"
LAST = "binance_pm_last_success_timestamp_seconds"


class Setup:
    def __init__(
        self, directory: Path, simulator: Simulator, entries: dict[str, Any], secret_b: str
    ) -> None:
        self.secret_b = secret_b
        self.directory = directory
        self.simulator = simulator
        self.entries = entries
        self.config = directory / "config.yaml"

    def write(self, names: list[str], **budget: Any) -> None:
        data = {
            "binance": {"base_url": self.simulator.url, "timeout_seconds": 2},
            "prices": {"base_url": self.simulator.url},
            "stream": {"enabled": False},  # no stream server: nothing beyond loopback
            "budget": {
                "ip_weight_limit_per_minute": 100_000,
                "share": 1.0,
                "min_interval_seconds": 1,
                **budget,
            },
            "accounts": [self.entries[n] for n in names],
        }
        self.config.write_text(yaml.safe_dump(data))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    names = ["acct-a", "acct-b", "acct-c", "acct-d"]
    sims, entries = hmac_accounts(names)
    by_name = {e["name"]: e for e in entries}
    # acct-b's secret comes from a file, as in production
    secret_b = by_name["acct-b"].pop("api_secret")
    secret = tmp_path / "acct-b.secret"
    secret.write_text(secret_b + "\n")
    by_name["acct-b"]["api_secret_file"] = str(secret)
    with Simulator(sims, ip_weight_limit=10**6, assets_per_account=3) as simulator:
        yield Setup(tmp_path, simulator, by_name, secret_b)


class Watch:
    """Scrapes the exporter all along, to catch a last-success time that goes backwards
    or vanishes even for a moment."""

    def __init__(self, run: ExporterProcess, names: list[str]) -> None:
        self.run, self.names = run, names
        self.problems: list[str] = []
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        seen: dict[str, float] = {}
        while not self._stop.is_set():
            try:
                text = self.run.get("/metrics").text
            except httpx.HTTPError as exc:
                self.problems.append(f"scrape failed: {exc!r}")
                continue
            self.scrapes += 1
            for name in self.names:
                prefix = f'{LAST}{{account="{name}"}} '
                line = next((x for x in text.splitlines() if x.startswith(prefix)), None)
                if line is None:
                    self.problems.append(f"{name}: absent")
                    continue
                value = float(line[len(prefix) :])
                if value < seen.get(name, 0.0):
                    self.problems.append(f"{name}: {seen[name]} -> {value}")
                seen[name] = value

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def reload(run: ExporterProcess) -> None:
    """SIGHUP, and wait until that reload is done (successful or not)."""
    done = len(run.events("config_reloaded")) + len(run.events("reload_failed"))
    run.signal(signal.SIGHUP)
    wait_until(
        lambda: len(run.events("config_reloaded")) + len(run.events("reload_failed")) > done,
        20,
        "the reload",
    )


@wall_time
def test_sighup_adds_removes_and_changes_accounts_and_keeps_the_rest(setup: Setup) -> None:
    setup.write(["acct-a", "acct-b", "acct-c"])
    with running("--config.file", str(setup.config)) as run:
        for name in ("acct-a", "acct-b", "acct-c"):
            wait_until(lambda n=name: run.sample("binance_pm_up", account=n) == 1.0, 15, name)
        started = run.sample(RELOADED)
        assert run.sample(SUCCESSFUL) == 1.0
        interval = run.sample("binance_pm_refresh_interval_seconds", account="acct-a")
        assert interval == 1.0

        with Watch(run, ["acct-a"]) as watch:
            # acct-d added, acct-c removed, acct-b's secret file replaced (by a wrong
            # secret: its refreshes must fail, so they use it), and a budget whose
            # floor now binds: every interval 3 s (short: the test waits for a's turn).
            (setup.directory / "acct-b.secret").write_text("0" * 64 + "\n")
            setup.write(["acct-a", "acct-b", "acct-d"], min_interval_seconds=3)
            reload(run)
            assert run.sample(SUCCESSFUL) == 1.0
            assert (run.sample(RELOADED) or 0) > (started or 0)
            (event,) = run.events("config_reloaded")
            assert event["added"] == ["acct-d"]
            assert event["removed"] == ["acct-c"]
            assert event["changed"] == ["acct-b"]
            text = run.get("/metrics").text
            assert 'account="acct-c"' not in text  # its series left /metrics
            assert run.sample("binance_pm_refresh_interval_seconds", account="acct-a") == 3.0
            wait_until(lambda: run.sample("binance_pm_up", account="acct-d") == 1.0, 15, "acct-d")
            wait_until(lambda: run.sample("binance_pm_up", account="acct-b") == 0.0, 15, "b down")

            # A broken config: nothing of it runs, one line says why, the metric says 0.
            good = setup.config.read_text()
            setup.config.write_text(good.replace("share: 1.0", "share: 1.5"))
            reload(run)
            assert run.sample(SUCCESSFUL) == 0.0
            (failed,) = run.events("reload_failed")
            assert "budget.share" in failed["error"]
            assert len(failed["error"].splitlines()) == 1
            assert run.sample("binance_pm_refresh_interval_seconds", account="acct-a") == 3.0
            # acct-d still polled (its `up` may blink on a loaded machine: not asserted)
            assert run.sample(LAST, account="acct-d") is not None
            # A secret file gone is a broken config too.
            (setup.directory / "acct-b.secret").unlink()
            setup.config.write_text(good)
            reload(run)
            assert run.sample(SUCCESSFUL) == 0.0
            assert "api_secret_file" in run.events("reload_failed")[-1]["error"]

            # The right secret back: acct-b gets its new credentials at once (not after the
            # backoff of its auth failures) and comes back up.
            (setup.directory / "acct-b.secret").write_text(setup.secret_b + "\n")
            reload(run)
            assert run.sample(SUCCESSFUL) == 1.0
            wait_until(lambda: run.sample("binance_pm_up", account="acct-b") == 1.0, 15, "b up")
            before = run.sample(LAST, account="acct-a") or 0
            wait_until(lambda: (run.sample(LAST, account="acct-a") or 0) > before, 20, "a polled")
        assert watch.scrapes > 10
        assert watch.problems == []
        assert run.stop() == 0
    assert "Traceback" not in "\n".join(run.lines)


@wall_time
def test_sighup_reapplies_the_shard(setup: Setup, tmp_path: Path) -> None:
    names = ["acct-a", "acct-b", "acct-c", "acct-d"]
    mine = [n for n in names if owner(n, 2) == 0]
    assert mine
    assert len(mine) < len(names)
    setup.write(["acct-a"])
    with running("--config.file", str(setup.config), "--shard", "0/2") as run:
        wait_until(lambda: run.get("/readyz").status_code == 200, 15, "ready")
        setup.write(names)
        reload(run)
        text = run.get("/metrics").text
        shown = sorted(n for n in names if f'binance_pm_up{{account="{n}"}}' in text)
        assert shown == mine
        assert run.stop() == 0


@wall_time
def test_a_new_route_gets_a_client_of_its_own_and_an_empty_egress_leaves(setup: Setup) -> None:
    setup.write(["acct-a", "acct-b"])
    with running("--config.file", str(setup.config)) as run:
        wait_until(lambda: run.get("/readyz").status_code == 200, 15, "ready")
        # both accounts now leave from 127.0.0.2: the default egress has no account left
        for name in ("acct-a", "acct-b"):
            setup.entries[name]["source_address"] = "127.0.0.2"
        setup.write(["acct-a", "acct-b"])
        reloaded = setup.simulator.requests[-1].time if setup.simulator.requests else 0.0
        reload(run)
        assert run.events("config_reloaded")[-1]["changed"] == ["acct-a", "acct-b"]

        def from_new_address() -> bool:
            after = [r for r in setup.simulator.requests if r.time > reloaded and r.account]
            accounts = {r.account for r in after if r.client_ip == "127.0.0.2"}
            return accounts == {"acct-a", "acct-b"}

        wait_until(from_new_address, 15, "requests from 127.0.0.2")
        text = run.get("/metrics").text
        assert 'binance_pm_weight_budget_per_minute{egress="source:127.0.0.2"}' in text
        assert 'egress="default"' not in text
        assert run.stop() == 0


@wall_time
def test_reload_can_be_called_from_another_thread_as_the_http_endpoint_will(
    setup: Setup,
) -> None:
    """Exporter.reload(): the entry point for `/-/reload`, from a server thread."""
    setup.write(["acct-a"])
    configs = [load_config(setup.config, {})]

    def load() -> Config:
        if len(configs) > 1:
            return configs.pop()
        raise ConfigError(["config.yaml: budget.share: must be <= 1"])

    with RunningExporter(configs[0], load=load) as run:
        wait_until(lambda: run.sample("binance_pm_up", account="acct-a") == 1.0, 15, "polling")
        assert run.exporter.reload() == "config.yaml: budget.share: must be <= 1"
        assert run.sample(SUCCESSFUL) == 0.0
        assert sorted(run.exporter.store.current.accounts) == ["acct-a"]
        setup.write(["acct-a", "acct-c"])
        configs.append(load_config(setup.config, {}))
        assert run.exporter.reload() is None
        assert run.sample(SUCCESSFUL) == 1.0
        assert sorted(run.exporter.store.current.accounts) == ["acct-a", "acct-c"]
        wait_until(lambda: run.sample("binance_pm_up", account="acct-c") == 1.0, 15, "acct-c")
    assert run.exporter.reload() == "the exporter is not running"


def test_an_unchanged_account_keeps_its_schedule_and_a_new_one_is_due_at_once(
    tmp_path: Path, clock: EventClock
) -> None:
    """On virtual time, the simulator in-process: acct-b's secret file rewritten with the
    same secret and acct-d added. acct-a keeps its turn, exactly one interval (6 s) after
    its last refresh; acct-d, due at once, goes at the poller's next turn, before it."""
    names = ["acct-a", "acct-b", "acct-d"]
    sims, entries = hmac_accounts(names)
    secret = tmp_path / "acct-b.secret"
    secret.write_text(entries[1].pop("api_secret") + "\n")
    entries[1]["api_secret_file"] = str(secret)
    simulator = Simulator(sims, clock=clock, ip_weight_limit=10**6, assets_per_account=3)
    pending = [fast_config("http://sim.test", entries, min_interval_seconds=6)]
    exporter = Exporter(
        fast_config("http://sim.test", entries[:2], min_interval_seconds=6),
        clock=clock,
        transport=SimTransport(simulator.state, clock),
        load=pending.pop,
    )
    start = clock.now()

    def balance_times(name: str) -> list[float]:
        return [
            round(r.time - start, 6)
            for r in simulator.requests
            if r.account == name and r.path == "/papi/v1/balance"
        ]

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(exporter.run(stop))
        await clock.run_until(start + 8)
        secret.write_text(secret.read_text())  # the same secret, written again
        # The clock stands still while the reload reads the config in its thread.
        assert await exporter.areload() is None
        await clock.run_until(start + 20)
        stop.set()
        await clock.run(task)

    asyncio.run(go())
    # a every 6 s from 0, b half an interval later: neither moved at the reload (8 s in),
    # so a's next turn is where it was (12 s), not at once
    assert balance_times("acct-a") == [0.0, 6.0, 12.0, 18.0]
    assert balance_times("acct-b") == [3.0, 9.0, 15.0]
    # d, due at once, went at the poller's next turn (b's, at 9 s), before a's
    first_d = balance_times("acct-d")[0]
    assert 9.0 <= first_d < 9.1


@wall_time
def test_post_reload_with_the_lifecycle_flag_and_not_without(setup: Setup) -> None:
    setup.write(["acct-a"])
    with running("--config.file", str(setup.config)) as run:
        response = httpx.post(f"{run.url}/-/reload", timeout=10)
        assert response.status_code in (404, 405)
        assert run.sample(SUCCESSFUL) == 1.0
    with running("--config.file", str(setup.config), "--web.enable-lifecycle") as run:
        wait_until(lambda: run.sample("binance_pm_up", account="acct-a") == 1.0, 15, "acct-a")
        assert run.get("/-/reload").status_code == 405  # a GET changes nothing
        setup.write(["acct-a", "acct-b"])
        response = httpx.post(f"{run.url}/-/reload", timeout=30)
        assert (response.status_code, response.text) == (200, "config reloaded\n")
        wait_until(lambda: run.sample("binance_pm_up", account="acct-b") == 1.0, 15, "acct-b")

        setup.write(["acct-a"], share=2.0)  # broken: the old config keeps running
        response = httpx.put(f"{run.url}/-/reload", timeout=30)
        assert response.status_code == 500
        assert response.text.startswith("failed to reload config: ")
        assert "budget.share" in response.text
        assert setup.secret_b not in response.text
        assert run.sample(SUCCESSFUL) == 0.0
        assert run.sample("binance_pm_up", account="acct-b") == 1.0
