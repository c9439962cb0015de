"""The exporter's user data stream client against the simulator over loopback.

Each scenario runs the client on an asyncio loop in the test thread and the
simulator in its own threads. Waits are conditions with deadlines. Where the
client's own timers matter (backoff, keep-alive, the 23 h reconnect), it runs on
`FastTime`: a clock and a sleep 10^4 times faster than the wall, consistent with
each other, and every requested sleep recorded.
"""

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import structlog
from pydantic import SecretStr
from support import proxies
from support.faultkit import captured_logs
from support.proxies import RecordingProxy, Seen, Socks5Proxy

from exporter.binance import errors
from exporter.binance.client import BinanceClient, RequestReport
from exporter.binance.events import (
    EVENT_KINDS,
    OTHER,
    MalformedFrame,
    parse_frame,
)
from exporter.binance.stream import (
    DEFAULT_TIMINGS,
    REASONS,
    ConnectPacer,
    StreamObserver,
    StreamTimings,
    UserDataStream,
    backoff_seconds,
)
from exporter.route import Route
from exporter.simulator import SimAccount, Simulator

API_KEYS = {"a": "api-key-a-" + "k" * 20, "b": "api-key-b-" + "k" * 20}
#: backoffs of a few ms, for scenarios on the wall clock; the rest as in production
FAST = StreamTimings(backoff_initial_seconds=0.01, backoff_cap_seconds=0.05)


class FastTime:
    """Virtual seconds that pass `speed` times faster than real ones."""

    def __init__(self, speed: float = 1e4) -> None:
        self.speed = speed
        self._start = time.monotonic()
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return (time.monotonic() - self._start) * self.speed

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(seconds / self.speed)


@dataclass
class Recorder(StreamObserver):
    events: list[Any] = field(default_factory=list)
    connects: int = 0
    reasons: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    key_failures: list[errors.BinanceError] = field(default_factory=list)

    def stream_connected(self) -> None:
        self.connects += 1

    def stream_disconnected(self, reason: str) -> None:
        self.reasons.append(reason)

    def stream_event(self, event: Any) -> None:
        self.events.append(event)

    def stream_frame_rejected(self, reason: str) -> None:
        self.rejected.append(reason)

    def listen_key_failed(self, error: errors.BinanceError) -> None:
        self.key_failures.append(error)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


async def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)
    return result


@dataclass
class Harness:
    sim: Simulator
    recorder: Recorder
    stream: UserDataStream
    reports: list[RequestReport]
    weights: list[int]
    task: "asyncio.Task[None]"


@pytest.fixture
def sim() -> Any:
    accounts = [SimAccount.hmac(name, key, f"secret-{name}") for name, key in API_KEYS.items()]
    with Simulator(accounts, stream_ping_interval=0.05) as sim:
        yield sim


@contextlib.asynccontextmanager
async def running(
    sim: Simulator,
    account: str = "a",
    *,
    source_address: str | None = None,
    proxy: str | None = None,
    timings: StreamTimings = FAST,
    **options: Any,
) -> AsyncIterator[Harness]:
    reports: list[RequestReport] = []
    weights: list[int] = []

    async def record(weight: int) -> None:
        weights.append(weight)

    acquire = options.pop("acquire", record)

    client = BinanceClient(
        base_url=sim.url,
        timeout_seconds=5,
        recv_window_ms=5000,
        observer=reports.append,
        route=Route(source_address=source_address),
    )
    recorder = Recorder()
    stream = UserDataStream(
        account=account,
        api_key=SecretStr(API_KEYS[account]),
        client=client,
        stream_url=sim.stream_url,
        acquire=acquire,
        pacer=options.pop("pacer", ConnectPacer()),
        observer=recorder,
        route=Route(proxy, source_address),
        rng=random.Random(7),
        timings=timings,
        **options,
    )
    task = asyncio.create_task(stream.run())
    harness = Harness(sim, recorder, stream, reports, weights, task)
    try:
        yield harness
    finally:
        await stream.close()
        await asyncio.wait_for(task, 10)
        await client.aclose()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


async def connected(h: Harness, times: int = 1) -> None:
    await until(lambda: h.recorder.connects >= times, what=f"connection {times}")
    await until(
        lambda: h.sim.stream.open_connections(h.stream.account) >= 1, what="the server's side"
    )


def listen_key_requests(sim: Simulator) -> list[tuple[str, int, int]]:
    return [(r.method, r.status, r.weight) for r in sim.requests if r.path == "/papi/v1/listenKey"]


# ---------------------------------------------------------------- events in


def test_an_admin_balance_change_arrives_as_an_event(sim: Simulator) -> None:
    async def scenario() -> None:
        async with running(sim) as h:
            await connected(h)
            sim.set_asset("a", "USDT", crossMarginFree="-3", negativeBalance="3")
            await until(lambda: "balanceUpdate" in h.recorder.kinds(), what="the events")
            position = h.recorder.events[0]
            assert position.kind == "outboundAccountPosition"
            assert position.moves_account
            assert abs(position.time_ms - time.time() * 1000) < 60_000
            assert h.weights == [1]  # the POST, paid to the caller's budget
            assert [(r.endpoint, r.outcome) for r in h.reports] == [("listen_key", "success")]
            assert listen_key_requests(sim) == [("POST", 200, 1)]

    run(scenario)


def test_risk_level_change_carries_its_fields(sim: Simulator) -> None:
    async def scenario() -> None:
        async with running(sim) as h:
            await connected(h)
            info = {
                **sim.account_info("a"),
                "accountStatus": "REDUCE_ONLY",
                "uniMMR": "1.05",
                "accountEquity": "1000.5",
                "actualEquity": "1001",
                "accountMaintMargin": "950",
            }
            sim.set_account_info("a", info)
            (risk,) = await until(lambda: [e for e in h.recorder.events if e.risk], what="risk")
            assert risk.kind == "riskLevelChange"
            assert risk.is_risk
            assert (risk.risk.status, risk.risk.uni_mmr, risk.risk.equity) == (
                "REDUCE_ONLY",
                1.05,
                1000.5,
            )
            assert (risk.risk.actual_equity, risk.risk.maint_margin) == (1001.0, 950.0)

    run(scenario)


def test_pings_are_answered(sim: Simulator) -> None:
    async def scenario() -> None:
        async with running(sim) as h:
            await connected(h)
            await until(lambda: sim.stream.pongs("a") >= 3, what="three pongs")

    run(scenario)


# ---------------------------------------------------------------- the listenKey


def test_the_key_is_kept_alive_every_30_minutes(sim: Simulator) -> None:
    clock = FastTime(1e4)

    async def scenario() -> None:
        async with running(sim, clock=clock.clock, sleep=clock.sleep) as h:
            await connected(h)
            key = sim.listen_key("a")
            await until(
                lambda: [m for m, _, _ in listen_key_requests(sim)].count("PUT") >= 2,
                what="two keep-alives",
            )
            assert 1800.0 in clock.sleeps
            assert sim.listen_key("a") == key
            assert h.recorder.connects == 1
            assert all(w == 1 for w in h.weights)
            assert {r.endpoint for r in h.reports} == {"listen_key"}

    run(scenario)


def test_a_failed_keep_alive_is_retried_within_a_minute(sim: Simulator) -> None:
    clock = FastTime(1e4)

    async def scenario() -> None:
        async with running(sim, clock=clock.clock, sleep=clock.sleep) as h:
            await connected(h)
            sim.inject_fault("status", endpoint="/papi/v1/listenKey", count=1, status=503)

            def retried() -> bool:
                outcomes = [r.outcome for r in h.reports]
                return "server_error" in outcomes[:-1]

            await until(retried, what="a keep-alive after the failed one")
            puts = [status for m, status, _ in listen_key_requests(sim) if m == "PUT"]
            assert puts[puts.index(503) + 1] == 200
            assert clock.sleeps.count(60.0) == 1
            assert h.recorder.connects == 1

    run(scenario)


def test_minus_1125_on_keep_alive_gets_a_new_key_and_reconnects(sim: Simulator) -> None:
    clock = FastTime(1e4)

    async def scenario() -> None:
        async with running(sim, clock=clock.clock, sleep=clock.sleep) as h:
            await connected(h)
            old = sim.listen_key("a")
            sim.stream_fault("forget_key", account="a")
            await connected(h, 2)
            assert h.recorder.reasons == ["key_unknown"]
            assert ("PUT", 400, 1) in listen_key_requests(sim)
            assert sim.listen_key("a") not in (None, old)
            sim.set_asset("a", "BTC", crossMarginFree="1")
            await until(lambda: h.recorder.events, what="an event on the new key")

    run(scenario)


def test_listen_key_expired_gets_a_new_key_and_reconnects(sim: Simulator) -> None:
    async def scenario() -> None:
        async with running(sim) as h:
            await connected(h)
            old = sim.listen_key("a")
            sim.stream_fault("expire_key", account="a")
            await connected(h, 2)
            assert h.recorder.kinds() == ["listenKeyExpired"]
            assert h.recorder.reasons == ["key_expired"]
            assert sim.listen_key("a") not in (None, old)
            assert [m for m, _, _ in listen_key_requests(sim)] == ["POST", "POST"]

    run(scenario)


def test_expiry_after_expiry_backs_off(sim: Simulator) -> None:
    fast = FastTime(1e4)
    now = [0.0]

    async def scenario() -> None:
        async with running(
            sim,
            clock=lambda: now[0],
            sleep=fast.sleep,
            timings=DEFAULT_TIMINGS,
        ) as h:
            await connected(h)
            sim.stream_fault("expire_key", account="a")
            await connected(h, 2)
            assert [s for s in fast.sleeps if s not in (1800.0, 82800.0)] == []
            sim.stream_fault("expire_key", account="a")  # again, within a minute
            await connected(h, 3)
            assert h.recorder.reasons == ["key_expired", "key_expired"]
            (backoff,) = [s for s in fast.sleeps if s not in (1800.0, 82800.0)]
            assert 1.0 <= backoff <= 2.0  # the second failure in a row

    run(scenario)


def test_a_429_on_the_listen_key_is_reported_and_retried(sim: Simulator) -> None:
    async def scenario() -> None:
        sim.inject_fault("rate_limit", endpoint="/papi/v1/listenKey", count=1, retry_after=7)
        async with running(sim) as h:
            await connected(h)
            (failure,) = h.recorder.key_failures
            assert isinstance(failure, errors.RateLimited)
            assert failure.retry_after == 7
            assert h.recorder.reasons == ["listen_key_failed"]
            assert [(r.endpoint, r.outcome) for r in h.reports] == [
                ("listen_key", "rate_limited"),
                ("listen_key", "success"),
            ]

    run(scenario)


def test_close_deletes_the_key(sim: Simulator) -> None:
    async def scenario() -> None:
        async with running(sim) as h:
            await connected(h)
            assert sim.listen_key("a") is not None
        assert h.task.done()
        assert h.recorder.reasons == ["shutdown"]
        assert sim.listen_key("a") is None
        assert listen_key_requests(sim)[-1] == ("DELETE", 200, 1)
        await until(lambda: sim.stream.open_connections("a") == 0, what="the server's side closed")

    run(scenario)


def test_close_does_not_wait_for_a_paused_budget(sim: Simulator) -> None:
    async def scenario() -> None:
        async def paused_for_good(weight: int) -> None:
            await asyncio.Event().wait()

        async with running(sim, acquire=paused_for_good) as h:
            await asyncio.sleep(0)
        assert h.task.done()  # running() waited for it
        assert h.recorder.reasons == ["shutdown"]
        assert listen_key_requests(sim) == []

    run(scenario)


# ---------------------------------------------------------------- drops and faults


def test_a_dropped_connection_reconnects_within_the_backoff(sim: Simulator) -> None:
    clock = FastTime(1e4)

    async def scenario() -> None:
        async with running(
            sim,
            clock=clock.clock,
            sleep=clock.sleep,
            timings=DEFAULT_TIMINGS,
        ) as h:
            await connected(h)
            sim.stream_fault("drop", account="a")
            await connected(h, 2)
            assert h.recorder.reasons == ["dropped"]
            backoffs = [s for s in clock.sleeps if s not in (1800.0, 82800.0)]
            assert len(backoffs) == 1
            assert 0.5 <= backoffs[0] <= 1.0
            posts = [m for m, _, _ in listen_key_requests(sim) if m == "POST"]
            assert posts == ["POST"]  # the same key

    run(scenario)


def test_a_connection_that_lived_a_minute_resets_the_backoff(sim: Simulator) -> None:
    fast = FastTime(1e4)
    now = [0.0]  # the clock that measures how long a connection lived: moved by hand

    async def scenario() -> None:
        async with running(
            sim,
            clock=lambda: now[0],
            sleep=fast.sleep,
            timings=DEFAULT_TIMINGS,
        ) as h:
            await connected(h)
            for times in (2, 3):
                now[0] += 61
                sim.stream_fault("drop", account="a")
                await connected(h, times)
            sim.stream_fault("drop", account="a")  # at once: a second failure in a row
            await connected(h, 4)
            backoffs = [s for s in fast.sleeps if s not in (1800.0, 82800.0)]
            assert [b <= 1.0 for b in backoffs] == [True, True, False]
            assert backoffs[2] <= 2.0

    run(scenario)


def test_refused_upgrades_back_off_exponentially_then_connect(sim: Simulator) -> None:
    clock = FastTime(1e4)
    sim.stream_fault("refuse_upgrades", count=4, status=503)

    async def scenario() -> None:
        async with running(
            sim,
            clock=clock.clock,
            sleep=clock.sleep,
            timings=StreamTimings(backoff_cap_seconds=4.0),
        ) as h:
            await connected(h)
            assert h.recorder.reasons == ["refused"] * 4
            backoffs = [s for s in clock.sleeps if s not in (1800.0, 82800.0)]
            steps = [1.0, 2.0, 4.0, 4.0]  # capped at 4
            assert len(backoffs) == 4
            for delay, step in zip(backoffs, steps, strict=True):
                assert step / 2 <= delay <= step
            assert sim.stream.refused == 4

    run(scenario)


def test_malformed_frames_and_unknown_events_are_ignored(sim: Simulator) -> None:
    async def scenario() -> None:
        async with running(sim) as h:
            await connected(h)
            sim.stream_fault("malformed", account="a")
            sim.stream_fault("malformed", account="a", body="[1, 2]")
            sim.stream_fault("unknown_event", account="a")
            sim.set_asset("a", "ETH", crossMarginLocked="1")
            await until(lambda: "outboundAccountPosition" in h.recorder.kinds(), what="event")
            assert h.recorder.rejected == ["malformed", "malformed"]
            assert h.recorder.kinds()[0] == OTHER
            assert not h.recorder.events[0].moves_account
            assert h.recorder.reasons == []
            assert h.recorder.connects == 1

    run(scenario)


def test_a_1_mb_frame_closes_the_connection_and_the_stream_recovers(sim: Simulator) -> None:
    async def scenario() -> None:
        async with running(sim) as h:
            await connected(h)
            sim.stream_fault("big_frame", account="a")
            await connected(h, 2)
            assert h.recorder.reasons == ["frame_too_big"]
            sim.set_asset("a", "ETH", crossMarginLocked="2")
            await until(lambda: h.recorder.events, what="an event after the big frame")

    run(scenario)


@pytest.mark.slow
def test_a_silent_server_is_detected_by_our_pings(sim: Simulator) -> None:
    async def scenario() -> None:
        timings = replace(FAST, ping_interval_seconds=0.05, ping_timeout_seconds=0.1)
        async with running(sim, timings=timings) as h:
            await connected(h)
            sim.stream_fault("silent", account="a")
            await until(lambda: "ping_timeout" in h.recorder.reasons, what="the ping timeout")
            sim.clear_faults()
            await until(lambda: h.recorder.connects >= 2, what="back after the silence")

    run(scenario)


def test_the_servers_24_hour_close_reconnects(sim: Simulator) -> None:
    async def scenario() -> None:
        sim.stream_fault("max_age", seconds=0.2)
        async with running(sim) as h:
            await connected(h, 2)
            assert h.recorder.reasons[0] == "closed"

    run(scenario)


@pytest.mark.slow
def test_we_reconnect_before_24_hours(sim: Simulator) -> None:
    clock = FastTime(1e5)  # 23 h in 0.8 s

    async def scenario() -> None:
        async with running(sim, clock=clock.clock, sleep=clock.sleep) as h:
            await connected(h, 2)
            assert h.recorder.reasons[0] == "max_age"
            assert 23 * 3600.0 in clock.sleeps

    run(scenario)


# ---------------------------------------------------------------- egress


def test_each_stream_connects_from_its_source_address(sim: Simulator) -> None:
    async def scenario() -> None:
        async with (
            running(sim, "a", source_address="127.0.0.2") as a,
            running(sim, "b", source_address="127.0.0.3") as b,
        ):
            await connected(a)
            await connected(b)
        assert sim.stream.peers("a") == ["127.0.0.2"]
        assert sim.stream.peers("b") == ["127.0.0.3"]
        by_account = {(r.account, r.client_ip) for r in sim.requests}
        assert by_account == {("a", "127.0.0.2"), ("b", "127.0.0.3")}

    run(scenario)


@pytest.mark.slow
def test_streams_of_one_egress_share_the_pacer(sim: Simulator) -> None:
    async def scenario() -> None:
        pacer = ConnectPacer(1, 3600.0)  # one attempt an hour for the whole egress
        async with running(sim, "a", pacer=pacer) as a, running(sim, "b", pacer=pacer) as b:
            await until(lambda: a.recorder.connects + b.recorder.connects == 1, what="one")
            with pytest.raises(AssertionError, match="timed out"):
                await until(lambda: a.recorder.connects + b.recorder.connects > 1, timeout=0.3)
        assert sim.stream.accepted("a") + sim.stream.accepted("b") == 1

    run(scenario)


def test_the_stream_goes_through_the_accounts_proxy(sim: Simulator) -> None:
    proxy = RecordingProxy({"user": ("proxy-s3cret", "127.0.0.3")})

    async def scenario() -> None:
        async with running(sim, proxy=proxy.url("user"), source_address="127.0.0.2") as h:
            await connected(h)

    with proxies.running(proxy):
        run(scenario)
    # a CONNECT tunnel, reached from the source address, with the proxy's credentials
    assert proxy.seen == [Seen("127.0.0.2", "user", "proxy-s3cret", None, "CONNECT")]
    assert sim.stream.peers("a") == ["127.0.0.3"]  # the proxy's own egress


def test_the_stream_goes_through_a_socks5_proxy(sim: Simulator) -> None:
    proxy = Socks5Proxy("127.0.0.3")

    async def scenario() -> None:
        async with running(sim, proxy=proxy.url, source_address="127.0.0.2") as h:
            await connected(h)

    with proxies.running(proxy):
        run(scenario)
    host, port = sim.stream.address
    assert proxy.requests == [(f"{host}:{port}", "user:socks-s3cret", "127.0.0.2")]
    assert sim.stream.peers("a") == ["127.0.0.3"]


# ---------------------------------------------------------------- secrets


def test_no_listen_key_or_api_key_in_logs_reprs_or_errors(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    keys: list[str] = []
    failures: list[str] = []

    async def scenario() -> None:
        sim.stream_fault("refuse_upgrades", count=1, status=400)
        sim.inject_fault("api_error", endpoint="/papi/v1/listenKey", count=1, code=-1000)
        async with running(sim) as h:
            await connected(h)
            keys.append(sim.listen_key("a") or "")
            sim.stream_fault("expire_key", account="a")
            await connected(h, 2)
            keys.append(sim.listen_key("a") or "")
            sim.stream_fault("malformed", account="a", body=f'{{"e": 1, "k": "{keys[-1]}"}}')
            sim.stream_fault("drop", account="a")
            await connected(h, 3)
            failures.extend(repr(e) + str(e) for e in h.recorder.key_failures)
            failures.extend([repr(h.stream), repr(h.recorder.events)])

    caplog.set_level(logging.DEBUG)
    with captured_logs() as logs, structlog.testing.capture_logs() as structured:
        run(scenario)
    assert all(keys)
    text = "\n".join([*logs.lines, caplog.text, json.dumps(structured, default=str), *failures])
    for secret in [*keys, API_KEYS["a"]]:
        assert secret not in text
    assert structured, "the scenario logged nothing: the check above checked nothing"


# ---------------------------------------------------------------- parts


def test_parse_frame() -> None:
    update = parse_frame('{"e":"ACCOUNT_UPDATE","E":1,"fs":"UM","a":{"m":"AUTO_EXCHANGE"}}')
    assert (update.kind, update.time_ms, update.reason, update.is_risk) == (
        "ACCOUNT_UPDATE",
        1,
        "AUTO_EXCHANGE",
        True,
    )
    expired = parse_frame('{"e":"listenKeyExpired","E":"1700000000000","listenKey":"x"}')
    assert (expired.kind, expired.time_ms, expired.moves_account) == (
        "listenKeyExpired",
        1700000000000,
        False,
    )
    assert parse_frame('{"e":"ORDER_TRADE_UPDATE"}').kind == "ORDER_TRADE_UPDATE"
    assert parse_frame('{"e":"brandNew","E":true}') == parse_frame('{"e":"x"}')
    odd = parse_frame('{"e":"riskLevelChange","u":"NaN","s":7,"eq":"1e5","ae":null}')
    assert odd.risk is not None
    assert (odd.risk.status, odd.risk.uni_mmr, odd.risk.equity) == (None, None, None)
    assert set(EVENT_KINDS) >= {"other", "riskLevelChange", "listenKeyExpired"}
    for bad in ("", "nope", "[]", '{"E": 1}', '{"e": 5}', b"\xff", "[" * 100_000):
        with pytest.raises(MalformedFrame) as caught:
            parse_frame(bad)
        assert "nope" not in str(caught.value)


def test_pacer_lets_a_burst_through_then_paces_by_the_window() -> None:
    now = [0.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    pacer = ConnectPacer(3, 10.0, clock=lambda: now[0], sleep=sleep)

    async def scenario() -> None:
        for _ in range(3):
            await pacer.acquire()
        assert waits == []
        now[0] = 4.0
        await pacer.acquire()
        assert waits == [6.0]
        assert now[0] == 10.0

    run(scenario)
    with pytest.raises(ValueError, match="attempts"):
        ConnectPacer(0)


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(1)
    for failures, step in [(1, 1.0), (2, 2.0), (3, 4.0), (8, 120.0), (50, 120.0)]:
        delays = [backoff_seconds(failures, rng, 1.0, 120.0) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays)
        assert len(set(delays)) > 1


def test_reasons_are_a_bounded_label_set() -> None:
    assert len(REASONS) == len(set(REASONS))
    assert all(r.islower() for r in REASONS)
