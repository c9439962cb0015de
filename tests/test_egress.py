"""One budget and one pause state per egress IP, against a simulator counting by client IP.

The exporter binds 127.0.0.2 and 127.0.0.3 (`source_address`); the simulator on
127.0.0.1 sees two clients, as Binance would see two egress IPs.
"""

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.harness import RunningExporter, sim_config
from support.waits import wait_until

from exporter.simulator import Simulator
from exporter.simulator.demo import GeneratedAccount, generate_account
from exporter.simulator.state import RequestRecord

pytestmark = pytest.mark.slow

EGRESS = {"a-0": "127.0.0.2", "a-1": "127.0.0.2", "b-0": "127.0.0.3", "b-1": "127.0.0.3"}


def egress_gauges(url: str, name: str) -> dict[tuple[str, ...], float]:
    """The PM egresses' series (the other hosts' budgets, `spot:...` for prices and the
    time fallback and `fapi:...` for the server time, left out)."""
    text = httpx.get(f"{url}/metrics").text
    return {
        tuple(s.labels.values()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and not s.labels["egress"].startswith(("spot:", "fapi:"))
    }


def pm_requests(sim: Simulator) -> list[RequestRecord]:
    """The requests to the PM API (the price ticker is the spot API's)."""
    return [r for r in sim.requests if r.path.startswith("/papi/")]


@pytest.fixture
def setup() -> Iterator[tuple[Simulator, RunningExporter]]:
    generated: list[GeneratedAccount] = [generate_account(name, "hmac") for name in EGRESS]
    with Simulator([g.sim_account for g in generated], "127.0.0.1") as sim:
        config = sim_config(
            sim.url,
            generated,
            {"share": 1.0, "min_interval_seconds": 1},
            extra={name: {"source_address": ip} for name, ip in EGRESS.items()},
        )
        with RunningExporter(config) as running:
            wait_until(lambda: not running.exporter.store.current.pending, what="all refreshed")
            yield sim, running


def test_each_egress_has_its_own_budget_and_the_simulator_sees_each_ip(
    setup: tuple[Simulator, RunningExporter],
) -> None:
    sim, running = setup
    assert [b.egress for b in running.exporter.budgets] == ["source:127.0.0.2", "source:127.0.0.3"]
    by_ip = {r.client_ip for r in pm_requests(sim)}
    assert by_ip == {"127.0.0.2", "127.0.0.3"}
    for record in pm_requests(sim):
        if record.account is not None:
            assert record.client_ip == EGRESS[record.account]
    spent = egress_gauges(running.url, "binance_pm_weight_spent_total")
    assert set(spent) == {("source:127.0.0.2",), ("source:127.0.0.3",)}
    assert all(value > 0 for value in spent.values())
    budget = egress_gauges(running.url, "binance_pm_weight_budget_per_minute")
    assert budget == {("source:127.0.0.2",): 6000.0, ("source:127.0.0.3",): 6000.0}
    used = egress_gauges(running.url, "binance_pm_ip_used_weight")
    assert set(used) == {("source:127.0.0.2",), ("source:127.0.0.3",)}


def test_a_ban_of_one_ip_pauses_only_that_ips_accounts(
    setup: tuple[Simulator, RunningExporter],
) -> None:
    sim, running = setup
    banned, free = running.exporter.budgets
    until_ms = int((time.time() + 600) * 1000)
    injected = time.time()
    sim.inject_fault("ban", account="a-0", count=1, until_ms=until_ms, retry_after=3)
    wait_until(lambda: banned.pause_reason == "banned", what="the ban seen")
    ban_seen = time.time()
    assert not free.is_paused(ban_seen)
    paused_until = banned.paused_until
    # Retry-After counts from the 418's arrival, somewhere between injecting and seeing it
    assert injected + 3 <= paused_until <= ban_seen + 3
    gauge = egress_gauges(running.url, "binance_pm_paused_until_timestamp_seconds")
    assert gauge == {("source:127.0.0.2",): paused_until, ("source:127.0.0.3",): 0.0}

    def resumed() -> bool:
        return any(r.client_ip == "127.0.0.2" and r.time >= paused_until for r in pm_requests(sim))

    wait_until(resumed, timeout=30, what="the banned IP to poll again")
    log = pm_requests(sim)
    ban = next(i for i, r in enumerate(log) if r.status == 418)
    during = [r for r in log[ban + 1 :] if r.time < paused_until]
    # at most one request of the banned IP after the 418: the other account's, already on
    # its way when the 418 came; the other IP kept polling
    assert len([r for r in during if r.client_ip == "127.0.0.2"]) <= 1
    assert [r for r in during if r.client_ip == "127.0.0.3"]
    pauses = egress_gauges(running.url, "binance_pm_pauses_total")
    assert pauses[("source:127.0.0.2", "banned")] == 1.0
    assert pauses[("source:127.0.0.3", "banned")] == 0.0
