"""Event-triggered refreshes on virtual time: the budget share, coalescing, priorities,
catch-ups, how soon a risk event is refreshed, and riskLevelChange in the snapshot.

The poller runs against an httpx.MockTransport on an EventClock (time moves only when
every task waits), so a minute of a stream at 200 events/s takes a few seconds.
"""

import asyncio
import itertools
import random
import subprocess
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from support.harness import RunningExporter, accounts, sim_config
from support.systools import require
from support.waits import wait_until
from test_poller import FakeApi, build_poller

from exporter.app import Exporter
from exporter.budget import BudgetLimits, refresh_interval
from exporter.collector import SnapshotCollector
from exporter.config import parse_config
from exporter.poller import EgressPoller
from exporter.selfmetrics import StreamHealth
from exporter.simulator import Simulator
from exporter.simulator.demo import exporter_config
from exporter.simulator.virtualtime import EventClock
from exporter.triggers import Priority, TriggerQueue

START = 1_700_000_010.0
LIMITS = BudgetLimits(6000, 0.25, 0.8)  # B = 1500
W = 40
SLOT = W / (1500 / 60.5)  # 1.613 s: one refresh slot of the whole budget


def names(n: int) -> list[str]:
    return [f"acct-{i}" for i in range(n)]


def balance_times(api: FakeApi, key: str | None = None) -> list[float]:
    return [t for t, path, k in api.log if path.endswith("/balance") and key in (None, k)]


def run(
    poller: EgressPoller,
    clock: EventClock,
    seconds: float,
    *drivers: Callable[[], Awaitable[None]],
) -> None:
    """Run the poller and `drivers` (coroutines sleeping on `clock`) for `seconds`."""

    async def go() -> None:
        task = asyncio.create_task(poller.run())
        others = [asyncio.create_task(d()) for d in drivers]
        await clock.run_until(START + seconds)
        for t in (task, *others):
            if t.done():
                t.result()
            t.cancel()
        await asyncio.gather(task, *others, return_exceptions=True)
        await poller.drain(1)

    asyncio.run(go())


def setup(
    n: int, *, min_interval: float = 10.0, stream: StreamHealth | None = None
) -> tuple[EgressPoller, FakeApi, EventClock, float]:
    clock = EventClock(START)
    api = FakeApi(clock)
    interval = refresh_interval(n, W, LIMITS, min_interval)
    poller, _, _ = build_poller(names(n), LIMITS, interval, clock, api, stream=stream)
    return poller, api, clock, interval


# ---- the queue's arithmetic alone ---------------------------------------------------


def test_queue_orders_risk_then_event_then_catchup_oldest_first() -> None:
    queue = TriggerQueue(W, rate=1e6, min_interval=2)  # tokens never short
    queue.add("c1", Priority.CATCHUP)
    queue.add("e1", Priority.EVENT)
    queue.add("e2", Priority.EVENT)
    queue.add("r1", Priority.RISK)
    queue.add("c2", Priority.CATCHUP)
    order = []
    for step in range(5):
        name, _ = queue.next(100.0 + step, busy=set())
        assert name is not None
        queue.start(name, 100.0 + step)
        order.append(name)
    assert order == ["r1", "e1", "e2", "c1", "c2"]
    assert queue.next(200.0, busy=set()) == (None, float("inf"))


def test_queue_coalesces_and_upgrades_an_account() -> None:
    queue = TriggerQueue(W, rate=1e6, min_interval=2)
    for _ in range(100):
        queue.add("a", Priority.CATCHUP)
    queue.add("a", Priority.RISK)
    queue.add("a", Priority.EVENT)  # a lower priority does not downgrade it
    assert len(queue) == 1
    assert queue.pending("a") is Priority.RISK
    assert queue.next(10.0, busy={"a"}) == (None, float("inf"))  # in flight: wait
    assert queue.next(10.0, busy=set()) == ("a", 10.0)
    queue.start("a", 10.0)
    queue.add("a", Priority.EVENT)
    assert queue.next(11.0, busy=set()) == (None, 12.0)  # min_interval after the last
    assert queue.next(12.0, busy=set()) == ("a", 12.0)


def test_queue_spends_at_most_half_the_rate_and_keeps_one_refresh_for_risk() -> None:
    rate = 1500 / 60.5
    queue = TriggerQueue(W, rate=rate, min_interval=0)
    t = 0.0
    starts = []
    while t < 600:
        queue.add(f"e{t}", Priority.EVENT)
        name, at = queue.next(t, busy=set())
        if name is None:
            t = at
            continue
        queue.start(name, t)
        starts.append(t)
    spent = len(starts) * W
    assert rate / 2 * 600 - 2 * W <= spent <= rate / 2 * 600 + 2 * W
    # EVENTs leave one refresh's worth in the bucket: a RISK goes at once
    queue.add("r", Priority.RISK)
    assert queue.next(t, busy=set()) == ("r", t)


# ---- the poller: budget, share and the 2x bound --------------------------------------


def weight_of(path: str) -> int:
    return 1 if path.endswith("/time") else 20


@pytest.mark.slow
def test_one_account_at_200_events_a_second_for_a_minute_stays_within_the_budget() -> None:
    """The issue's budget test: 20 accounts (polling-only interval 32.3 s), acct-7 emits
    200 events/s from t=30 to t=90."""
    stream = StreamHealth(names(20))
    poller, api, clock, interval = setup(20, stream=stream)
    events = 0

    async def busy_account() -> None:
        # 200 a second, ten at a time every 50 ms: a tenth of the steps of the virtual
        # clock (each runs every ready task), the same events to the triggers
        nonlocal events
        await clock.sleep(30)
        while clock() < START + 90:
            for _ in range(10):
                poller.trigger("acct-7", Priority.EVENT)
                events += 1
            await clock.sleep(0.05)

    run(poller, clock, 240, busy_account)
    assert events >= 11_900
    spent = [(t, weight_of(path)) for t, path, _ in api.log]
    for t, _ in spent:  # every 60 s window holds at most B
        assert sum(w for s, w in spent if t <= s < t + 60) <= 1500
    busy = balance_times(api, "acct-7")
    assert min(b - a for a, b in itertools.pairwise(busy)) >= 2.0 - 1e-9
    triggered = stream.triggered.labels("acct-7", "balance")._value.get()
    assert 12 <= triggered <= 60 / 2 + 1
    assert len([t for t in busy if START + 30 <= t < START + 92]) == pytest.approx(triggered, abs=1)
    worst = 0.0
    for i in range(20):
        if i == 7:
            continue
        own = balance_times(api, f"acct-{i}")
        worst = max(worst, *(b - a for a, b in itertools.pairwise(own)))
    assert worst <= 2 * interval
    assert worst > 1.3 * interval  # the triggers did take their half


@pytest.mark.slow
def test_every_account_busy_still_keeps_every_interval_within_2x() -> None:
    """All 20 accounts emit events for 120 s, RISK and EVENT mixed: the triggered half is
    always full, yet no account waits more than 2x its polling-only interval."""
    poller, api, clock, interval = setup(20)
    rng = random.Random(3)

    async def storm() -> None:
        await clock.sleep(10)
        while clock() < START + 130:
            poller.trigger(rng.choice(names(20)), rng.choice([Priority.RISK, Priority.EVENT]))
            await clock.sleep(0.05)

    run(poller, clock, 200, storm)
    spent = [(t, weight_of(path)) for t, path, _ in api.log]
    assert max(sum(w for s, w in spent if t <= s < t + 60) for t, _ in spent) <= 1500
    for name in names(20):
        own = balance_times(api, name)
        assert max(b - a for a, b in itertools.pairwise(own)) <= 2 * interval, name


@pytest.mark.slow
def test_a_risk_trigger_starts_within_a_slot_behind_200_catchups() -> None:
    """200 accounts on the default budget (a slot every 1.6 s, each account every 323 s):
    all 200 streams reconnect at t=20 (CATCHUPs), then a riskLevelChange every 15 s on a
    random account must start its refresh at the next slot."""
    poller, api, clock, interval = setup(200)
    assert interval == pytest.approx(322.7, abs=0.1)
    rng = random.Random(9)
    risks: list[tuple[float, str]] = []

    async def streams() -> None:
        await clock.sleep(20)
        for name in names(200):
            poller.trigger(name, Priority.CATCHUP)
        for _ in range(20):
            await clock.sleep(rng.uniform(10, 20))
            name = rng.choice(names(200))
            risks.append((clock(), name))
            poller.trigger(name, Priority.RISK)

    run(poller, clock, 340, streams)
    assert len(risks) == 20
    delays = []
    for at, name in risks:
        after = [t for t in balance_times(api, name) if t >= at]
        delays.append(after[0] - at)
    assert max(delays) <= SLOT + 0.01
    # and the catch-ups went on meanwhile, a quarter of B at most, CATCHUP last
    caught = {k for t, path, k in api.log if START + 20 <= t < START + 340}
    assert len(caught) > 150


# ---- coalescing ----------------------------------------------------------------------


class HeldApi(FakeApi):
    """FakeApi, but the requests to `held` (default: balance) of API key `hold` wait for
    `release`."""

    def __init__(self, clock: EventClock, hold: str = "", held: str = "balance") -> None:
        super().__init__(clock)
        self.hold = hold
        self.held = held
        self.release = asyncio.Event()

    async def answer(self, request: httpx.Request) -> httpx.Response:
        response = self(request)
        if request.headers.get("X-MBX-APIKEY") == self.hold and self.held in request.url.path:
            await self.release.wait()
        return response


def quiet_poller(
    n: int, api: HeldApi, clock: EventClock, stream: StreamHealth | None = None
) -> EgressPoller:
    """n accounts whose round-robin turns are 300/n s apart (min_interval 300)."""
    poller, _, _ = build_poller(
        names(n), LIMITS, 300.0, clock, api.answer, timeout=1000, stream=stream
    )
    return poller


def test_triggers_coalesce_and_one_in_flight_makes_exactly_one_more() -> None:
    clock = EventClock(START)
    api = HeldApi(clock, hold="acct-1")
    poller = quiet_poller(3, api, clock)  # turns at 0, 100, 200

    async def stream() -> None:
        await clock.sleep(10)
        poller.trigger("acct-1", Priority.EVENT)  # starts at once, held until 15
        await clock.sleep(1)
        for _ in range(5):
            poller.trigger("acct-1", Priority.EVENT)
        await clock.sleep(4)
        api.release.set()
        await clock.sleep(15)
        poller.trigger("acct-2", Priority.EVENT)  # 30: at once
        await clock.sleep(0.5)
        # 30.5: a routine refresh never holds a risk one back: at the next budget slot
        poller.trigger("acct-2", Priority.RISK)
        await clock.sleep(1.6)
        for _ in range(3):  # RISK: an EVENT would also wait for the bucket to refill
            poller.trigger("acct-2", Priority.RISK)  # 32.1: min_interval after that RISK

    run(poller, clock, 90, stream)
    # turns at 100 and 200 were moved on by the triggered refreshes
    assert [t - START for t in balance_times(api, "acct-1")] == pytest.approx([10, 15])
    assert [t - START for t in balance_times(api, "acct-2")] == pytest.approx(
        [30, 30 + SLOT, 32 + SLOT]
    )


def test_queued_triggers_go_risk_then_event_then_catchup() -> None:
    clock = EventClock(START)
    api = HeldApi(clock)
    poller = quiet_poller(5, api, clock)  # turns at 0, 60, 120, 180, 240

    async def stream() -> None:
        await clock.sleep(20)
        poller.trigger("acct-1", Priority.CATCHUP)
        poller.trigger("acct-2", Priority.EVENT)
        poller.trigger("acct-3", Priority.RISK)
        poller.trigger("acct-4", Priority.EVENT)
        poller.trigger("acct-0", Priority.RISK)

    run(poller, clock, 50, stream)
    after = [(t - START, k) for t, path, k in api.log if "balance" in path and t >= START + 20]
    assert [k for _, k in after] == ["acct-3", "acct-0", "acct-2", "acct-4", "acct-1"]
    # two RISKs at once (a full bucket), the others at B/2 with one refresh kept for RISK
    assert after[0][0] == pytest.approx(20)
    assert after[1][0] == pytest.approx(20 + SLOT)


def test_a_catchup_near_the_turn_is_dropped_and_a_triggered_refresh_moves_the_turn() -> None:
    clock = EventClock(START)
    api = HeldApi(clock)
    poller = quiet_poller(3, api, clock)  # turns at 0, 100, 200

    async def stream() -> None:
        await clock.sleep(97)
        poller.trigger("acct-1", Priority.CATCHUP)  # its turn is 3 s away: dropped
        await clock.sleep(23)
        poller.trigger("acct-2", Priority.CATCHUP)  # 120: its turn is 80 s away

    run(poller, clock, 450, stream)
    assert [t - START for t in balance_times(api, "acct-1")] == pytest.approx([100, 400])
    # refreshed at 120, so its turn moved from 200 to 420
    assert [t - START for t in balance_times(api, "acct-2")] == pytest.approx([120, 420])


def test_unknown_accounts_and_failing_accounts_are_not_triggered() -> None:
    clock = EventClock(START)
    api = HeldApi(clock)
    api.fail["acct-0"] = (httpx.Response(401, json={"code": -2015}), 0.0, 1e12)
    poller = quiet_poller(3, api, clock)

    async def stream() -> None:
        await clock.sleep(10)
        poller.trigger("nobody", Priority.RISK)
        poller.trigger("acct-0", Priority.RISK)  # backing off after its 401 at 0

    run(poller, clock, 90, stream)
    assert balance_times(api) == [pytest.approx(START, abs=0.1)]


# ---- riskLevelChange in the snapshot -----------------------------------------------


def exposition(poller: EgressPoller) -> str:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(poller._store))
    return generate_latest(registry).decode()


MARGIN_CALL = 'binance_pm_account_status{account="acct-0",status="MARGIN_CALL"} 1.0'
NORMAL = 'binance_pm_account_status{account="acct-0",status="NORMAL"} 1.0'


def test_apply_risk_shows_at_the_next_scrape_and_the_triggered_refresh_reconciles() -> None:
    clock = EventClock(START)
    api = HeldApi(clock)
    poller = quiet_poller(3, api, clock)
    seen: list[str] = []

    async def stream() -> None:
        await clock.sleep(10)
        assert NORMAL in exposition(poller)
        poller.apply_risk(
            "acct-0",
            uni_mmr=1.08,
            equity=1000.0,
            actual_equity=990.0,
            maint_margin=925.0,
            status="MARGIN_CALL",
            event_time=START + 9.9,
        )
        seen.append(exposition(poller))  # before any request
        poller.trigger("acct-0", Priority.RISK)

    run(poller, clock, 30, stream)
    text = seen[0]
    assert MARGIN_CALL in text
    assert 'binance_pm_uni_mmr{account="acct-0"} 1.08' in text
    assert 'binance_pm_account_equity_usd{account="acct-0"} 1000.0' in text
    assert 'binance_pm_maint_margin_usd{account="acct-0"} 925.0' in text
    assert balance_times(api, "acct-0")[-1] == pytest.approx(START + 10)
    assert NORMAL in exposition(poller)  # what REST says wins once it is asked again
    assert 'binance_pm_uni_mmr{account="acct-0"} 3.5' in exposition(poller)


def test_a_risk_event_during_a_refresh_survives_it_until_the_next() -> None:
    """The refresh in flight signed its account request (at 10) before the event (at 11):
    it does not answer it, so the event's figures stay until the next refresh."""
    clock = EventClock(START)
    api = HeldApi(clock, held="account")
    poller = quiet_poller(3, api, clock)
    seen: list[str] = []

    async def stream() -> None:
        await clock.sleep(10)
        api.hold = "acct-0"
        poller.trigger("acct-0", Priority.RISK)  # its account request held until 11.5
        await clock.sleep(1)
        poller.apply_risk(
            "acct-0",
            uni_mmr=1.08,
            equity=None,
            actual_equity=None,
            maint_margin=None,
            status="REDUCE_ONLY",
            event_time=START + 11,
        )
        poller.apply_risk(  # an older event: ignored
            "acct-0",
            uni_mmr=9.0,
            equity=None,
            actual_equity=None,
            maint_margin=None,
            status="MARGIN_CALL",
            event_time=START + 5,
        )
        # in flight: one more after it, at 12 (one RISK refresh per 2 s)
        poller.trigger("acct-0", Priority.RISK, event_time=START + 11)
        await clock.sleep(0.5)
        api.hold = ""  # the next one is answered at once
        api.release.set()
        await clock.sleep(0.001)
        seen.append(exposition(poller))  # the held refresh is done, the next not yet

    run(poller, clock, 30, stream)
    assert 'status="REDUCE_ONLY"} 1.0' in seen[0]
    assert 'binance_pm_uni_mmr{account="acct-0"} 1.08' in seen[0]
    assert NORMAL in exposition(poller)


def test_apply_risk_without_account_info_is_ignored() -> None:
    clock = EventClock(START)
    api = HeldApi(clock)
    poller, store, _ = build_poller(["acct-1"], LIMITS, 300.0, clock, api, account_info=False)
    poller.apply_risk(
        "acct-1",
        uni_mmr=1.0,
        equity=None,
        actual_equity=None,
        maint_margin=None,
        status="MARGIN_CALL",
        event_time=START,
    )
    assert store.get("acct-1").info is None


# ---- the stream's health metrics ---------------------------------------------------


def test_stream_health_metrics_and_promtool() -> None:
    registry = CollectorRegistry()
    health = StreamHealth(["a", "b"])
    registry.register(health)
    health.stream_connected("a")
    health.stream_event("a", "riskLevelChange", 1_700_000_000.5)
    health.stream_event("a", "ORDER_TRADE_UPDATE", None)
    health.stream_event("a", "\n{evil}", 1_700_000_001.0)
    health.stream_disconnected("b", "dropped")
    health.triggered_refresh("a", ["balance"])
    health.triggered_refresh("a", ["balance", "account"])
    text = generate_latest(registry).decode()
    for line in (
        'binance_pm_stream_up{account="a"} 1.0',
        'binance_pm_stream_up{account="b"} 0.0',
        'binance_pm_stream_last_event_timestamp_seconds{account="a"} 1.700000001e+09',
        'binance_pm_stream_events_total{account="a",event="riskLevelChange"} 1.0',
        'binance_pm_stream_events_total{account="a",event="other"} 2.0',
        'binance_pm_stream_reconnects_total{account="b",reason="dropped"} 1.0',
        'binance_pm_stream_triggered_refreshes_total{account="a",endpoint="balance"} 2.0',
        'binance_pm_stream_triggered_refreshes_total{account="a",endpoint="account"} 1.0',
        'binance_pm_stream_triggered_refreshes_total{account="b",endpoint="balance"} 0.0',
    ):
        assert line in text, line
    assert "evil" not in text
    health.forget("b")  # a reload removed it
    text_after = generate_latest(registry).decode()
    assert 'binance_pm_stream_up{account="b"}' not in text_after
    assert 'binance_pm_stream_triggered_refreshes_total{account="b"' not in text_after
    assert 'binance_pm_stream_up{account="a"} 1.0' in text_after
    check = subprocess.run(
        [require("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout + check.stderr == ""


# ---- wired: the exporter against the simulator, on real time -------------------------


@pytest.mark.slow
def test_the_exporter_refreshes_a_triggered_account_long_before_its_turn() -> None:
    # The streams are off (no stream_url): the triggers come from the test, as the stream
    # clients would call them (tests/test_stream_wiring.py runs the real streams).
    generated = accounts(3)
    budget = {"min_interval_seconds": 300}  # turns at 0, 100 and 200 s
    with Simulator([g.sim_account for g in generated]) as sim:
        config = sim_config(sim.url, generated, budget)
        with RunningExporter(config) as running:
            wait_until(lambda: running.sample("binance_pm_up", account="acct-00") == 1)
            asset = sim.balances("acct-00")[0]["asset"]
            sim.set_asset("acct-00", asset, negativeBalance="12.5")
            poller = running.exporter.poller_of["acct-00"]
            running.call_soon(poller.trigger, "acct-00", Priority.RISK)
            labels = {"account": "acct-00", "asset": asset}
            wait_until(lambda: running.sample("binance_pm_negative_balance", **labels) == 12.5)
            risk = partial(
                poller.apply_risk,
                "acct-00",
                uni_mmr=1.1,
                equity=None,
                actual_equity=None,
                maint_margin=None,
                status="MARGIN_CALL",
                event_time=time.time(),
            )
            running.call_soon(risk)
            status = {"account": "acct-00", "status": "MARGIN_CALL"}
            wait_until(lambda: running.sample("binance_pm_account_status", **status) == 1)
            assert running.sample("binance_pm_uni_mmr", account="acct-00") == 1.1


def test_no_stream_series_when_the_stream_is_disabled() -> None:
    generated = accounts(1)
    data = exporter_config("http://127.0.0.1:9", generated)
    data["stream"] = {"enabled": False}
    exporter = Exporter(parse_config(data, environ={}, base_dir=Path.cwd()))
    assert exporter.stream_health is None
    assert exporter.streams is None
    assert "binance_pm_stream" not in generate_latest(exporter.registry).decode()
    enabled = sim_config("http://127.0.0.1:9", generated, stream_url="ws://127.0.0.1:9/pm/ws")
    assert "binance_pm_stream_up" in generate_latest(Exporter(enabled).registry).decode()
