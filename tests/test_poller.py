"""The scheduler on virtual time: spacing, budget, pauses and backoff.

The PM API here is an httpx.MockTransport that answers at once, and the clock (the
EventClock) only moves when every task waits on it, so every figure is exact and fast.
"""

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import httpx
import pytest
import structlog.testing
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from exporter import poller as poller_module
from exporter.binance.client import BinanceClient, Credentials
from exporter.binance.signing import HmacSigner
from exporter.budget import BudgetLimits, WeightBudget, refresh_interval
from exporter.collectors import Collector, enabled
from exporter.collectors.account import COLLECTOR as ACCOUNT
from exporter.collectors.balance import COLLECTOR as BALANCE
from exporter.logs import configure_logging
from exporter.poller import BACKOFF_CAP_SECONDS, EgressPoller, PollSettings, Target
from exporter.selfmetrics import Instruments, StreamHealth
from exporter.simulator.virtualtime import EventClock
from exporter.snapshot import AccountSnapshot, SnapshotStore

START = 1_699_999_990.0  # 10 s into a minute


@dataclass
class FakeApi:
    """Answers like the PM API; `fail` maps an API key to a response to give instead,
    from and until the times given with it."""

    clock: EventClock
    log: list[tuple[float, str, str]] = field(default_factory=list)
    fail: dict[str, tuple[httpx.Response, float, float]] = field(default_factory=dict)
    used_weight: Callable[[float], int] = lambda now: 100

    def __call__(self, request: httpx.Request) -> httpx.Response:
        key = request.headers.get("X-MBX-APIKEY", "")
        self.log.append((self.clock(), request.url.path, key))
        headers = {"X-MBX-USED-WEIGHT-1M": str(self.used_weight(self.clock()))}
        failure, since, until = self.fail.get(key, (None, 0.0, 0.0))
        if failure is not None and since <= self.clock() < until:
            return httpx.Response(
                failure.status_code, content=failure.content, headers={**headers, **failure.headers}
            )
        if request.url.path.endswith("/time"):
            return httpx.Response(200, json={"serverTime": int(self.clock() * 1000)})
        if request.url.path.endswith("/account"):
            return httpx.Response(
                200, json={"uniMMR": "3.5", "accountStatus": "NORMAL"}, headers=headers
            )
        body = [{"asset": "USDT", "crossMarginFree": "1.0", "negativeBalance": "0"}]
        return httpx.Response(200, content=json.dumps(body), headers=headers)


def build_poller(
    names: list[str],
    limits: BudgetLimits,
    interval: float,
    clock: Any,
    api: Callable[[httpx.Request], Any],
    *,
    account_info: bool = True,
    timeout: float = 1,
    key_of: Callable[[str], str] = lambda name: name,
    backoff_cap: float = BACKOFF_CAP_SECONDS,
    stream: StreamHealth | None = None,
    trigger_interval: float = 2.0,
    collectors: tuple[Collector[Any], ...] | None = None,
) -> tuple[EgressPoller, SnapshotStore, WeightBudget]:
    """An EgressPoller of accounts `names` on `clock`, asking `api`: balance and, with
    `account_info`, account info, unless `collectors` says."""
    settings = PollSettings(
        allows_asset=lambda a: True,
        interval=interval,
        collectors=enabled({"account_info": account_info}) if collectors is None else collectors,
        backoff_cap=backoff_cap,
        trigger_interval=trigger_interval,
    )
    targets = [
        Target(n, Credentials(SecretStr(key_of(n)), HmacSigner(SecretStr("s")))) for n in names
    ]
    store = SnapshotStore(AccountSnapshot(t.name, interval) for t in targets)
    budget = WeightBudget("default", limits, clock=clock, sleep=clock.sleep)
    poller = EgressPoller(
        targets=targets,
        make_client=partial(
            BinanceClient,
            base_url="http://binance.test",
            timeout_seconds=timeout,
            recv_window_ms=5000,
            clock=clock,
            transport=httpx.MockTransport(api),
        ),
        budget=budget,
        store=store,
        instruments=Instruments(CollectorRegistry()),
        settings=settings,
        clock=clock,
        sleep=clock.sleep,
        stream=stream,
    )
    return poller, store, budget


def make_poller(
    n: int,
    limits: BudgetLimits,
    min_interval: float,
    *,
    account_info: bool = True,
    backoff_cap: float = BACKOFF_CAP_SECONDS,
) -> tuple[EgressPoller, FakeApi, EventClock, SnapshotStore, WeightBudget]:
    """n accounts acct-0.. (API keys key-0..) against a FakeApi, on virtual time."""
    clock = EventClock(START)
    api = FakeApi(clock)
    interval = refresh_interval(n, 40 if account_info else 20, limits, min_interval)
    poller, store, budget = build_poller(
        [f"acct-{i}" for i in range(n)],
        limits,
        interval,
        clock,
        api,
        account_info=account_info,
        key_of=lambda name: name.replace("acct", "key"),
        backoff_cap=backoff_cap,
    )
    return poller, api, clock, store, budget


def run_for(poller: EgressPoller, clock: EventClock, seconds: float) -> None:
    async def go() -> None:
        task = asyncio.create_task(poller.run())
        await clock.run_until(START + seconds)
        if task.done():
            task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await poller.drain(1)

    asyncio.run(go())


def balance_times(api: FakeApi, key: str | None = None) -> list[float]:
    return [t for t, path, k in api.log if path.endswith("/balance") and key in (None, k)]


def test_ten_accounts_at_the_budgeted_pace_from_the_first_second() -> None:
    # 10 accounts, w = 40, B = 1500: an account refresh every 1.6 s, each every 16 s.
    limits = BudgetLimits(6000, 0.25, 0.8)
    poller, api, clock, store, budget = make_poller(10, limits, min_interval=10)
    run_for(poller, clock, 300)
    starts = balance_times(api)
    assert starts[0] == pytest.approx(START, abs=0.1)  # after the time sync, no waiting
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) == pytest.approx(1.6, rel=0.01)  # no burst, ever
    for i in range(10):
        own = balance_times(api, f"key-{i}")
        intervals = [b - a for a, b in itertools.pairwise(own)]
        assert sum(intervals) / len(intervals) == pytest.approx(16, rel=0.03)
    # never more than B in any 60 s window, and nearly all of it used
    spent = [(t, 20) for t, path, _ in api.log if not path.endswith("/time")]
    for t, _ in spent:
        assert sum(w for s, w in spent if t <= s < t + 60) <= 1500
    assert sum(w for _, w in spent) >= 0.95 * 1500 * 300 / 60
    assert all(a.up for a in store.current.accounts.values())
    # the time sync (/fapi/v1/time) counts in the futures host's pool, not this budget
    assert budget.spent_total == sum(w for _, w in spent)


def test_min_interval_is_a_floor() -> None:
    poller, api, clock, _, _ = make_poller(2, BudgetLimits(6000, 0.25, 0.8), min_interval=30)
    run_for(poller, clock, 200)
    own = balance_times(api, "key-0")
    assert [b - a for a, b in itertools.pairwise(own)] == pytest.approx(
        [30.0] * (len(own) - 1), abs=0.1
    )
    starts = balance_times(api)
    assert starts[1] - starts[0] == pytest.approx(15, abs=0.1)  # spread across the interval


class LateClock(EventClock):
    """An EventClock whose sleepers all wake `late` seconds after they asked: an event loop
    kept busy by other work (a flood of scrapes)."""

    def __init__(self, start: float, late: float) -> None:
        super().__init__(start)
        self.late = late

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + self.late)


def test_a_loop_late_on_every_turn_does_not_move_the_cadence() -> None:
    # A budget far wider than needed (a slot of ms), every wake-up 0.1 s late: each turn
    # comes 0.1 s after it was due, and the next is still due on the even cadence.
    clock = LateClock(START, late=0.1)
    api = FakeApi(clock)
    names = [f"acct-{i}" for i in range(10)]
    poller, _, _ = build_poller(names, BudgetLimits(1_000_000, 1.0, 0.9), 5.0, clock, api)
    run_for(poller, clock, 120)
    for name in names:
        own = balance_times(api, name)
        assert len(own) >= 23
        lateness = [t - (own[0] + k * 5.0) for k, t in enumerate(own)]
        assert max(lateness) < 0.2  # on main's rule: 0.1 s more every turn (2.3 s here)


def test_high_water_pauses_every_request_until_the_next_minute() -> None:
    poller, api, clock, _, budget = make_poller(3, BudgetLimits(6000, 0.25, 0.8), 10)
    # another client on the IP spends 80% during the minute starting at START + 50
    api.used_weight = lambda now: 4900 if START + 50 <= now < START + 110 else 100
    run_for(poller, clock, 200)
    first_high = next(t for t, _, _ in api.log if t >= START + 50)
    sent_during_pause = [t for t, _, _ in api.log if first_high < t < START + 110]
    assert sent_during_pause == [] or all(t - first_high < 0.001 for t in sent_during_pause)
    assert budget.pauses["high_water"] >= 1
    assert any(t >= START + 110 for t, _, _ in api.log)  # and polling resumes


WAF_PAGE = b"<html><head><title>403 Forbidden</title></head><body>403 Forbidden</body></html>"


@pytest.mark.parametrize(
    ("response", "pause", "reason"),
    [
        (
            httpx.Response(
                429, json={"code": -1003, "msg": "Too many"}, headers={"Retry-After": "25"}
            ),
            "25 s",
            "rate_limited",
        ),
        (
            httpx.Response(429, json={"code": -1003, "msg": "Too many"}),
            "next minute",
            "rate_limited",
        ),
        (
            httpx.Response(418, json={"code": -1003, "msg": "IP banned until 1700000200000."}),
            "ban end",
            "banned",
        ),
        # Binance's firewall: about the IP, not the account, so it pauses the IP too
        (httpx.Response(403, content=WAF_PAGE), "next minute", "waf_blocked"),
        (
            httpx.Response(403, content=WAF_PAGE, headers={"Retry-After": "25"}),
            "25 s",
            "waf_blocked",
        ),
    ],
)
def test_429_418_and_403_stop_every_account_until_the_pause_ends(
    response: httpx.Response, pause: str, reason: str
) -> None:
    poller, api, clock, store, budget = make_poller(4, BudgetLimits(6000, 0.25, 0.8), 10)
    api.fail["key-1"] = (response, START, START + 3)  # its first refresh, at START + 2.5
    run_for(poller, clock, 400)
    t0 = next(t for t, _, key in api.log if key == "key-1")
    end = {
        "25 s": t0 + 25,
        "next minute": (t0 // 60 + 1) * 60 + 0.5,
        "ban end": 1700000200.5,
    }[pause]
    assert budget.paused_until == pytest.approx(end, abs=0.01)
    assert [t for t, _, _ in api.log if t0 < t < end] == []
    assert min(t for t, _, _ in api.log if t > t0) == pytest.approx(end, abs=0.01)
    assert all(a.up for a in store.current.accounts.values())  # recovered afterwards
    assert budget.pauses == {reason: 1}


def test_a_failing_account_backs_off_alone_then_recovers() -> None:
    poller, api, clock, store, _ = make_poller(3, BudgetLimits(6000, 0.25, 0.8), 10)
    api.fail["key-1"] = (httpx.Response(500, content=b"oops"), START + 30, START + 300)
    run_for(poller, clock, 400)
    tries = [t for t in balance_times(api, "key-1") if t >= START + 30]
    gaps = [round(b - a) for a, b in itertools.pairwise(tries)]
    assert gaps[:4] == [10, 20, 40, 80]  # exponential
    others = balance_times(api, "key-0")
    assert [round(b - a) for a, b in itertools.pairwise(others)] == [10] * (len(others) - 1)
    recovered = store.get("acct-1")
    assert recovered.up
    assert recovered.consecutive_failures == 0


def test_a_failing_account_keeps_its_last_values_while_down() -> None:
    poller, api, clock, store, _ = make_poller(1, BudgetLimits(6000, 0.25, 0.8), 10)
    api.fail["key-0"] = (httpx.Response(502, content=b"Bad Gateway"), START + 5, START + 1000)
    snapshots: list[AccountSnapshot] = []
    original = api.__call__

    def record(request: httpx.Request) -> httpx.Response:
        snapshots.append(store.get("acct-0"))
        return original(request)

    poller._client._http._transport = httpx.MockTransport(record)
    run_for(poller, clock, 100)
    good = next(s for s in snapshots if s.up)
    down = store.get("acct-0")
    assert not down.up
    assert down.balances == good.balances
    assert down.info == good.info
    assert down.last_success == good.last_success
    assert down.consecutive_failures >= 2


def test_auth_errors_go_straight_to_the_cap() -> None:
    poller, api, clock, store, _ = make_poller(2, BudgetLimits(6000, 0.25, 0.8), 10)
    api.fail["key-0"] = (
        httpx.Response(401, json={"code": -2015, "msg": "Invalid API-key"}),
        START,
        START + 10_000,
    )
    run_for(poller, clock, 700)
    tries = balance_times(api, "key-0")
    assert [round(b - a) for a, b in itertools.pairwise(tries)] == [300, 300]
    assert store.get("acct-0").consecutive_failures == 3
    assert store.get("acct-1").up


def test_the_backoff_cap_is_a_setting() -> None:
    limits = BudgetLimits(60000, 1.0, 0.8)  # a budget that never holds a retry back
    poller, api, clock, _, _ = make_poller(2, limits, 10, backoff_cap=25)
    api.fail["key-0"] = (httpx.Response(500, content=b"oops"), START, START + 10_000)
    api.fail["key-1"] = (
        httpx.Response(401, json={"code": -2015, "msg": "Invalid API-key"}),
        START,
        START + 10_000,
    )
    run_for(poller, clock, 120)
    server_error = balance_times(api, "key-0")
    assert [round(b - a) for a, b in itertools.pairwise(server_error)][:4] == [10, 20, 25, 25]
    auth_error = balance_times(api, "key-1")
    assert [round(b - a) for a, b in itertools.pairwise(auth_error)][:3] == [25, 25, 25]


def test_timestamp_error_resyncs_the_clock_and_retries() -> None:
    poller, api, clock, store, _ = make_poller(1, BudgetLimits(6000, 0.25, 0.8), 10)
    api.fail["key-0"] = (
        httpx.Response(400, json={"code": -1021, "msg": "Timestamp outside"}),
        START,
        START + 0.5,
    )
    run_for(poller, clock, 5)
    paths = [path.rsplit("/", 1)[1] for _, path, _ in api.log]
    assert paths[:5] == ["time", "balance", "time", "balance", "account"]
    assert store.get("acct-0").up


def test_a_retry_after_a_1021_reserves_the_weight_of_the_call_it_retries() -> None:
    heavier = replace(ACCOUNT, request=replace(ACCOUNT.request, weight=30))  # balance's is 20
    clock = EventClock(START)
    api = FakeApi(clock)
    rejected: list[float] = []

    def account_call_rejected_once(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/account") and not rejected:
            rejected.append(clock())
            return httpx.Response(400, json={"code": -1021, "msg": "Timestamp outside"})
        return api(request)

    limits = BudgetLimits(6000, 0.25, 0.8)
    poller, store, budget = build_poller(
        ["acct-0"], limits, 10, clock, account_call_rejected_once, collectors=(BALANCE, heavier)
    )
    acquired: list[int] = []
    reserve = budget.reserve

    def recording(weight: int, now: float) -> None:
        acquired.append(weight)
        reserve(weight, now)

    budget.reserve = recording  # type: ignore[method-assign]
    run_for(poller, clock, 5)
    paths = [path.rsplit("/", 1)[1] for _, path, _ in api.log]
    assert paths[:4] == ["time", "balance", "time", "account"]
    # the refresh (20 + 30), then the account call again: 30; the time syncs are paid
    # from the futures host's budget, never this (the PM) one
    assert acquired[:2] == [50, 30]
    assert store.get("acct-0").up


# --- a pause holds the later requests of a refresh already in flight -----------------------


def test_a_pause_holds_the_later_requests_of_a_refresh_in_flight(clock: EventClock) -> None:
    """a's balance is answered only once b has had a 429 (Retry-After 30): a's account
    request, the second of its refresh, must wait for the pause to end."""
    start = clock.now()
    sent: list[tuple[float, str, str]] = []
    b_limited = asyncio.Event()

    async def api(request: httpx.Request) -> httpx.Response:
        key = request.headers.get("X-MBX-APIKEY", "")
        path = request.url.path.rsplit("/", 1)[1]
        sent.append((clock(), key, path))
        if path == "time":
            return httpx.Response(200, json={"serverTime": int(clock() * 1000)})
        if key == "b" and not b_limited.is_set():
            b_limited.set()
            return httpx.Response(429, json={"code": -1003}, headers={"Retry-After": "30"})
        if key == "a" and path == "balance":
            await b_limited.wait()
        body: object = [] if path == "balance" else {"uniMMR": "5"}
        return httpx.Response(200, json=body)

    egress, store, budget = build_poller(
        ["a", "b"], BudgetLimits(6000, 1.0, 0.9), 10.0, clock, api, timeout=100
    )

    async def go() -> None:
        task = asyncio.create_task(egress.run())
        await clock.run_until(start + 60)
        if task.done():
            task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await egress.drain(1)

    asyncio.run(go())
    limited = next(i for i, (_, key, _) in enumerate(sent) if key == "b")
    end = sent[limited][0] + 30
    assert budget.paused_until == pytest.approx(end, abs=0.001)
    assert min(t for t, _, _ in sent[limited + 1 :]) == pytest.approx(end, abs=0.001)
    a_account = next(t for t, key, path in sent if key == "a" and path == "account")
    assert a_account == pytest.approx(end, abs=0.001)
    assert store.get("a").up


def test_a_failure_slower_than_its_backoff_says_retry_in_0_not_a_negative_wait() -> None:
    clock = EventClock(START)
    api = FakeApi(clock)

    def slow_failure(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/balance"):
            clock.time += 30  # the answer takes longer than the 10 s backoff
            return httpx.Response(500, content=b"oops")
        return api(request)

    limits = BudgetLimits(6000, 0.25, 0.8)
    poller, _, _ = build_poller(["acct-0"], limits, 10, clock, slow_failure, account_info=False)
    with structlog.testing.capture_logs() as logs:
        run_for(poller, clock, 100)
    retry_in = [e["retry_in"] for e in logs if e["event"] == "poll_failed"]
    assert retry_in
    assert min(retry_in) == 0  # it was next_due - now: -20.0


@pytest.mark.timeout(60)  # 2**62 as an exponent hangs: fail, do not wait forever
@pytest.mark.parametrize("failures_before", [1024, 2**62])
def test_three_bad_days_of_failures_keep_the_cap_with_one_line_per_failure(
    failures_before: int,
) -> None:
    """Failure 1,025 (3.5 days at the 300 s cap) overflowed `interval * 2 ** n` as a float
    inside the failure handler: the backoff was lost and the account retried every second.
    A restored consecutive_failures of 2**62 hung the process."""
    configure_logging("debug", "json")  # the repeats of one failure are debug lines
    limits = BudgetLimits(60000, 1.0, 0.8)
    clock = EventClock(START)
    api = FakeApi(clock)
    api.fail["acct-0"] = (httpx.Response(500, content=b"oops"), START, START + 10_000)
    poller, store, _ = build_poller(["acct-0"], limits, 1.0, clock, api, account_info=False)
    store.replace(replace(store.get("acct-0"), consecutive_failures=failures_before))
    with structlog.testing.capture_logs() as logs:
        run_for(poller, clock, 1000)
    tries = balance_times(api, "acct-0")
    assert len(tries) >= 3
    assert [round(b - a) for a, b in itertools.pairwise(tries)] == [300] * (len(tries) - 1)
    failed = [e for e in logs if e["event"] == "poll_failed"]
    assert len(failed) == len(tries)
    assert failed[0]["failures"] == failures_before + 1
    assert [e["retry_in"] for e in failed] == [300.0] * len(tries)
    assert store.get("acct-0").consecutive_failures == failures_before + len(tries)


@pytest.mark.parametrize("failures", [0, 1, 9, 10, 1024, 1025, 10**6, 2**62, 2**100])
def test_backoff_is_bounded_for_any_count(failures: int) -> None:
    error = RuntimeError("boom")
    expected = min(10 * 2 ** max(failures - 1, 0), 300) if failures < 64 else 300
    assert poller_module.backoff(10, failures, error, 300) == expected


def test_an_event_time_far_ahead_does_not_hide_the_next_margin_call() -> None:
    """E = 999999999999999 (year 33658) made every later riskLevelChange look old: a real
    margin call was ignored until a restart."""
    clock = EventClock(START)
    health = StreamHealth(["acct-0"])
    poller, store, _ = build_poller(
        ["acct-0"], BudgetLimits(6000, 0.25, 0.8), 300.0, clock, FakeApi(clock), stream=health
    )
    risk = {"uni_mmr": None, "equity": None, "actual_equity": None, "maint_margin": None}
    with structlog.testing.capture_logs() as logs:
        poller.apply_risk("acct-0", **risk, status="REDUCE_ONLY", event_time=999999999999.999)
        poller.apply_risk("acct-0", **risk, status="MARGIN_CALL", event_time=START - 0.5)
        # a day ahead is still an event time; a later, older event is still ignored
        poller.apply_risk("acct-0", **risk, status="SUPPLY_MARGIN", event_time=START + 86000)
        poller.apply_risk("acct-0", **risk, status="NORMAL", event_time=START - 0.4)
    info = store.get("acct-0").info
    assert info is not None
    assert info.status == "SUPPLY_MARGIN"
    assert health.future_events.labels("acct-0")._value.get() == 1
    assert [e["event"] for e in logs] == ["stream_event_in_future"]


def test_a_margin_call_after_a_future_event_shows_at_once() -> None:
    clock = EventClock(START)
    poller, store, _ = build_poller(
        ["acct-0"], BudgetLimits(6000, 0.25, 0.8), 300.0, clock, FakeApi(clock)
    )
    risk = {"uni_mmr": None, "equity": None, "actual_equity": None, "maint_margin": None}
    poller.apply_risk("acct-0", **risk, status="NORMAL", event_time=999999999999.999)
    poller.apply_risk("acct-0", **risk, status="MARGIN_CALL", event_time=START)
    info = store.get("acct-0").info
    assert info is not None
    assert info.status == "MARGIN_CALL"
