"""The simulator in-process (exporter/simulator/transport.py): the same answers as over
loopback HTTP, the same weight and request log, and its faults on the virtual clock, so
a poller's backoff and timeouts come out exact to the virtual second."""

from __future__ import annotations

import asyncio
import itertools
import time
from functools import partial

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from support.harness import accounts, fast_config

from exporter.app import Exporter
from exporter.binance import errors
from exporter.binance.client import BinanceClient, Credentials
from exporter.binance.signing import HmacSigner
from exporter.budget import BudgetLimits, WeightBudget
from exporter.collectors import enabled
from exporter.poller import EgressPoller, PollSettings, Target
from exporter.selfmetrics import Instruments
from exporter.simulator import SimAccount, Simulator
from exporter.simulator.transport import SimTransport
from exporter.simulator.virtualtime import EventClock
from exporter.snapshot import AccountSnapshot, SnapshotStore

BALANCE = "/papi/v1/balance"
KEY, SECRET = "key-a", "secret-a"
GOOD = Credentials(SecretStr(KEY), HmacSigner(SecretStr(SECRET)))
WRONG = Credentials(SecretStr(KEY), HmacSigner(SecretStr("not-the-secret")))


def client(
    clock: EventClock,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    url: str = "http://sim.test",
    timeout: float = 1.0,
) -> BinanceClient:
    return BinanceClient(
        base_url=url, timeout_seconds=timeout, recv_window_ms=5000, clock=clock, transport=transport
    )


def test_in_process_answers_as_loopback_http_does(clock: EventClock) -> None:
    """One signed balance request and one with a wrong signature, each sent both ways:
    the same data, the same error, the same weight charged to the same IP."""

    async def both(sim: Simulator) -> list[object]:
        results: list[object] = []
        for c in (
            client(clock, url=sim.url),
            client(clock, transport=SimTransport(sim.state, clock)),
        ):
            results.append(await c.balance(GOOD))
            with pytest.raises(errors.BinanceError) as refused:
                await c.balance(WRONG)
            results.append((type(refused.value), refused.value.code))
            await c.aclose()
        return results

    with Simulator([SimAccount.hmac("a", KEY, SECRET)], clock=clock, assets_per_account=3) as sim:
        results = asyncio.run(both(sim))
        log = [(r.path, r.status, r.weight, r.client_ip) for r in sim.requests]
        assert sim.weight_used("127.0.0.1") == 4 * 20
    over_http, in_process = results[:2], results[2:]
    assert over_http == in_process
    assert in_process[1] == (errors.AuthError, -1022)
    assert log[:2] == log[2:]
    assert log[0] == (BALANCE, 200, 20, "127.0.0.1")


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("status", {"status": 500}),
        ("status", {"status": 502}),  # an HTML page
        ("status", {"status": 503, "body": '{"code":-1008,"msg":"Service Unavailable."}'}),
        ("malformed_json", {}),
        ("raw", {"body": "null"}),
        ("api_error", {"code": -1022, "msg": "Signature for this request is not valid."}),
        ("api_error", {"status": 401, "code": -2015, "msg": "Invalid API-key."}),
        ("reset", {}),
        ("rate_limit", {"retry_after": 7}),
        ("rate_limit", {}),
        ("ban", {"until_ms": 1_700_000_000_000}),
        ("raw", {"status": 403, "body": "<html>403 Forbidden</html>"}),
    ],
)
def test_each_answering_fault_fails_alike_in_process_and_over_loopback(
    clock: EventClock, kind: str, params: dict[str, object]
) -> None:
    """The fault matrix's faults that answer at once (tests/test_faults.py), injected with
    a count of 2 and sent both ways: the same error twice (type, code, Retry-After, ban
    end), then the count is spent and the data comes back."""

    def seen(error: errors.BinanceError) -> tuple[object, ...]:
        return (
            type(error),
            getattr(error, "code", None),
            getattr(error, "retry_after", None),
            getattr(error, "banned_until", None),
        )

    async def both(sim: Simulator) -> list[object]:
        results: list[object] = []
        for c in (
            client(clock, url=sim.url),
            client(clock, transport=SimTransport(sim.state, clock)),
        ):
            sim.inject_fault(kind, endpoint=BALANCE, count=2, **params)
            for _ in range(2):
                with pytest.raises(errors.BinanceError) as failed:
                    await c.balance(GOOD)
                results.append(seen(failed.value))
            results.append(len((await c.balance(GOOD)).balances))
            await c.aclose()
        return results

    with Simulator([SimAccount.hmac("a", KEY, SECRET)], clock=clock, assets_per_account=3) as sim:
        results = asyncio.run(both(sim))
        log = [(r.path, r.status, r.weight) for r in sim.requests]
    over_http, in_process = results[:3], results[3:]
    assert over_http == in_process
    assert in_process[0] == in_process[1]
    assert in_process[2] == 3  # the fault spent, the balances again
    assert log[:3] == log[3:]


@pytest.mark.parametrize(
    ("kind", "params", "raised", "seconds"),
    [
        ("stall", {"seconds": 5}, errors.RequestTimeout, 1.0),  # past the client's 1 s
        ("stall", {"seconds": 0.25}, errors.ConnectionFailed, 0.25),  # closed mid-body
        ("latency", {"seconds": 0.5}, None, 0.5),  # slow, then answered
        ("latency", {"seconds": 3}, errors.RequestTimeout, 1.0),
        ("reset", {}, errors.ConnectionFailed, 0.0),
    ],
)
def test_faults_take_their_time_on_the_virtual_clock(
    clock: EventClock,
    kind: str,
    params: dict[str, float],
    raised: type[errors.BinanceError] | None,
    seconds: float,
) -> None:
    sim = Simulator([SimAccount.hmac("a", KEY, SECRET)], clock=clock)  # never started
    sim.inject_fault(kind, endpoint=BALANCE, count=1, **params)
    c = client(clock, transport=SimTransport(sim.state, clock))
    ended: list[float] = []

    async def call() -> None:
        try:
            if raised is None:
                await c.balance(GOOD)
            else:
                with pytest.raises(raised):
                    await c.balance(GOOD)
        finally:
            ended.append(clock.now())
            await c.aclose()

    start = clock.now()
    asyncio.run(clock.run(call()))
    assert ended == [pytest.approx(start + seconds, abs=1e-9)]
    assert [r.path for r in sim.requests] == [BALANCE]


def test_a_stalling_account_backs_off_exactly_1_2_4_8_intervals(clock: EventClock) -> None:
    """Every balance request of b stalls past the client's timeout: b's tries start
    interval x 1, 2, 4, 8 apart, to the virtual second, while a keeps its interval."""
    interval = 10.0
    sim = Simulator(
        [SimAccount.hmac("a", "key-a", "s-a"), SimAccount.hmac("b", "key-b", "s-b")],
        clock=clock,
        ip_weight_limit=10**6,
    )
    sim.inject_fault("stall", endpoint=BALANCE, account="b", seconds=60)
    targets = [
        Target(n, Credentials(SecretStr(f"key-{n}"), HmacSigner(SecretStr(f"s-{n}"))))
        for n in ("a", "b")
    ]
    store = SnapshotStore(AccountSnapshot(t.name, interval) for t in targets)
    budget = WeightBudget("default", BudgetLimits(10**6, 1.0, 0.9), clock=clock, sleep=clock.sleep)
    poller = EgressPoller(
        targets=targets,
        make_client=partial(
            BinanceClient,
            base_url="http://sim.test",
            timeout_seconds=1.0,
            recv_window_ms=5000,
            clock=clock,
            transport=SimTransport(sim.state, clock),
        ),
        budget=budget,
        store=store,
        instruments=Instruments(CollectorRegistry()),
        settings=PollSettings(
            allows_asset=lambda a: True,
            interval=interval,
            collectors=enabled({}),
            backoff_cap=300,
        ),
        clock=clock,
        sleep=clock.sleep,
    )
    start = clock.now()

    async def go() -> None:
        task = asyncio.create_task(poller.run())
        await clock.run_until(start + 160)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await poller.drain(1)

    asyncio.run(go())
    tries = {
        name: [r.time - start for r in sim.requests if r.path == BALANCE and r.account == name]
        for name in ("a", "b")
    }
    first = tries["b"][0]
    assert [t - first for t in tries["b"]] == [0.0, 10.0, 30.0, 70.0, 150.0]
    a = tries["a"]
    assert [round(y - x, 9) for x, y in itertools.pairwise(a)] == [interval] * (len(a) - 1)
    assert len(a) == 16
    assert not store.get("b").up
    assert store.get("b").consecutive_failures == 5
    # what the budget spent is what the simulator charged: one weight accounting
    assert budget.spent_total == sum(r.weight for r in sim.requests if r.path.startswith("/papi/"))


def test_the_whole_exporter_runs_on_one_virtual_clock(clock: EventClock) -> None:
    """Exporter(clock=, transport=): pollers, budgets, clock sync and the price source all
    on the EventClock, the simulator in-process. Ten virtual minutes take a moment of
    wall time, and every account is refreshed at exactly its interval."""
    generated = accounts(3)
    sim = Simulator([g.sim_account for g in generated], clock=clock, ip_weight_limit=60000)
    config = fast_config("http://sim.test", generated, min_interval_seconds=5)
    exporter = Exporter(config, clock=clock, transport=SimTransport(sim.state, clock))
    start = clock.now()

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(exporter.run(stop))
        await clock.run_until(start + 600)
        stop.set()
        await task

    began = time.monotonic()
    asyncio.run(go())
    wall = time.monotonic() - began
    for g in generated:
        name = g.sim_account.name
        times = [r.time for r in sim.requests if r.path == BALANCE and r.account == name]
        assert [round(b - a, 9) for a, b in itertools.pairwise(times)] == [5.0] * 119, name
        assert exporter.store.get(name).up
    tickers = [r.time for r in sim.requests if r.path == "/api/v3/ticker/price"]
    assert len(tickers) >= 10  # the price source ran on the same clock
    spent = sum(b.spent_total for b in exporter.budgets)  # the accounts' route
    charged = sum(r.weight for r in sim.requests if r.path.startswith("/papi/"))
    assert spent == charged == 3 * 120 * 40  # one accounting, both sides
    assert wall < 60  # ten virtual minutes; generous: the figure is the exact spacing above
