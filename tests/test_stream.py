"""The exporter's user data stream client against the simulator.

Its life on the virtual clock: the client runs on the simulator in-process (REST through
`SimTransport`, the stream through `SimStream`, exporter/simulator/memstream.py), every
timer on one `EventClock`, so the 30-minute keep-alive, the 23 h reconnect, the server's
24 h close, each backoff and the listenKey retries are asserted to the virtual second,
and a day of a stream's life takes a moment.

Over a real WebSocket (the simulator's stream server on loopback): what only a socket
shows, the close codes and pings as `websockets` reports them, the handshake's logging,
and the route (source address, HTTP and SOCKS5 proxies). Those wait on conditions with
deadlines, in wall time, through tests/support/waits.py.
"""

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
import structlog
from conftest import VIRTUAL_START
from pydantic import SecretStr
from support import proxies
from support.faultkit import captured_logs
from support.proxies import RecordingProxy, Seen, Socks5Proxy
from support.waits import wait_until

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
    StreamConnection,
    StreamObserver,
    StreamTimings,
    UserDataStream,
    backoff_seconds,
    websocket_connect,
)
from exporter.clock import SYSTEM_CLOCK
from exporter.route import DEFAULT, Route
from exporter.simulator import SimAccount, Simulator
from exporter.simulator.memstream import SimStream
from exporter.simulator.transport import SimTransport
from exporter.simulator.virtualtime import EventClock

API_KEYS = {"a": "api-key-a-" + "k" * 20, "b": "api-key-b-" + "k" * 20}
T0 = VIRTUAL_START
LISTEN_KEY = "/papi/v1/listenKey"
#: the seed of every stream's jitter: `jitters()` gives the same draws
SEED = 7


def jitters(*failures: int, timings: StreamTimings = DEFAULT_TIMINGS) -> list[float]:
    """The backoffs a stream seeded with SEED waits after these failure counts, in order."""
    rng = random.Random(SEED)
    return [
        backoff_seconds(n, rng, timings.backoff_initial_seconds, timings.backoff_cap_seconds)
        for n in failures
    ]


@dataclass
class Recorder(StreamObserver):
    """What a stream reported, and when (on the clock it runs on)."""

    clock: Callable[[], float]
    events: list[Any] = field(default_factory=list)
    connected_at: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    ended_at: list[float] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    key_failures: list[errors.BinanceError] = field(default_factory=list)

    @property
    def connects(self) -> int:
        return len(self.connected_at)

    def stream_connected(self) -> None:
        self.connected_at.append(self.clock())

    def stream_disconnected(self, reason: str) -> None:
        self.reasons.append(reason)
        self.ended_at.append(self.clock())

    def stream_event(self, event: Any) -> None:
        self.events.append(event)

    def stream_frame_rejected(self, reason: str) -> None:
        self.rejected.append(reason)

    def listen_key_failed(self, error: errors.BinanceError) -> None:
        self.key_failures.append(error)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


@dataclass
class Harness:
    sim: Simulator
    recorder: Recorder
    stream: UserDataStream
    reports: list[RequestReport]
    weights: list[int]
    #: when each WebSocket connection was attempted
    attempts: list[float]
    task: "asyncio.Task[None]"

    def listen_key_calls(self) -> list[tuple[str, int, float]]:
        """(method, status, when) of each listenKey request the simulator answered."""
        return [(r.method, r.status, r.time) for r in self.sim.requests if r.path == LISTEN_KEY]

    def puts(self) -> list[tuple[int, float]]:
        return [
            (status, when) for method, status, when in self.listen_key_calls() if method == "PUT"
        ]


def sim_accounts() -> list[SimAccount]:
    return [SimAccount.hmac(name, key, f"secret-{name}") for name, key in API_KEYS.items()]


@contextlib.asynccontextmanager
async def client_of(
    sim: Simulator,
    account: str,
    *,
    base_url: str,
    stream_url: str,
    connect: Callable[[str, Route, StreamTimings], Awaitable[StreamConnection]],
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
    pacer: ConnectPacer,
    timings: StreamTimings,
    until_closed: Callable[["asyncio.Task[None]"], Awaitable[None]],
    route: Route = DEFAULT,
    transport: httpx.AsyncBaseTransport | None = None,
    acquire: Callable[[int], Awaitable[None]] | None = None,
) -> AsyncIterator[Harness]:
    """A stream of `account` against `sim`, its requests and connections recorded."""
    reports: list[RequestReport] = []
    weights: list[int] = []
    attempts: list[float] = []

    async def record(weight: int) -> None:
        weights.append(weight)

    async def connecting(url: str, by: Route, with_timings: StreamTimings) -> StreamConnection:
        attempts.append(clock())
        return await connect(url, by, with_timings)

    client = BinanceClient(
        base_url=base_url,
        timeout_seconds=5,
        recv_window_ms=5000,
        observer=reports.append,
        route=Route(source_address=route.source_address),
        transport=transport,
        clock=clock,
    )
    recorder = Recorder(clock)
    stream = UserDataStream(
        account=account,
        api_key=SecretStr(API_KEYS[account]),
        client=client,
        stream_url=stream_url,
        acquire=acquire or record,
        pacer=pacer,
        observer=recorder,
        route=route,
        rng=random.Random(SEED),
        timings=timings,
        clock=clock,
        sleep=sleep,
        connect=connecting,
    )
    task = asyncio.create_task(stream.run())
    try:
        yield Harness(sim, recorder, stream, reports, weights, attempts, task)
    finally:
        await stream.close()
        await until_closed(task)
        await client.aclose()


# ---------------------------------------------------------------- on the virtual clock


@dataclass
class Virtual:
    """The simulator in-process on one EventClock: REST and the stream, no socket."""

    sim: Simulator
    server: SimStream
    clock: EventClock

    def running(
        self,
        account: str = "a",
        *,
        timings: StreamTimings = DEFAULT_TIMINGS,
        pacer: ConnectPacer | None = None,
        acquire: Callable[[int], Awaitable[None]] | None = None,
    ) -> contextlib.AbstractAsyncContextManager[Harness]:
        clock = self.clock
        return client_of(
            self.sim,
            account,
            base_url="http://sim.test",
            stream_url=self.server.url,
            connect=self.server.connect,
            clock=clock,
            sleep=clock.sleep,
            pacer=pacer or ConnectPacer(clock=clock, sleep=clock.sleep),
            timings=timings,
            until_closed=clock.run,
            transport=SimTransport(self.sim.state, clock),
            acquire=acquire,
        )

    async def at(self, when: float) -> None:
        """Run everything due by `when` (seconds after T0); the clock stops there."""
        await self.clock.run_to(T0 + when)

    async def settle(self) -> None:
        """Run what is ready; no time passes."""
        await self.clock.settle()


@pytest.fixture
def virtual(clock: EventClock) -> Virtual:
    sim = Simulator(sim_accounts(), clock=clock)  # never started: no socket, no thread
    return Virtual(sim, SimStream(sim.state, clock), clock)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def since(times: list[float]) -> list[float]:
    """Virtual times as seconds after T0."""
    return [t - T0 for t in times]


def approx(seconds: list[float]) -> Any:
    """Virtual seconds as exact as floats near T0 hold them (2**-22 s)."""
    return pytest.approx(seconds, abs=1e-6)


def since_each(calls: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """(status, seconds after T0) of each (status, virtual time)."""
    return [(status, when - T0) for status, when in calls]


def test_an_admin_balance_change_arrives_as_an_event(virtual: Virtual) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.settle()
            assert since(h.recorder.connected_at) == [0.0]
            await virtual.at(5)
            virtual.sim.set_asset("a", "USDT", crossMarginFree="-3", negativeBalance="3")
            await virtual.settle()
            assert h.recorder.kinds()[:2] == ["outboundAccountPosition", "balanceUpdate"]
            position = h.recorder.events[0]
            assert position.moves_account
            assert position.time_ms == (T0 + 5) * 1000
            assert h.weights == [1]  # the POST, paid to the caller's budget
            assert [(r.endpoint, r.outcome) for r in h.reports] == [("listen_key", "success")]
            assert h.listen_key_calls() == [("POST", 200, T0)]

    run(scenario)


def test_risk_level_change_carries_its_fields(virtual: Virtual) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.settle()
            info = {
                **virtual.sim.account_info("a"),
                "accountStatus": "REDUCE_ONLY",
                "uniMMR": "1.05",
                "accountEquity": "1000.5",
                "actualEquity": "1001",
                "accountMaintMargin": "950",
            }
            virtual.sim.set_account_info("a", info)
            await virtual.settle()
            (risk,) = [e for e in h.recorder.events if e.risk]
            assert risk.kind == "riskLevelChange"
            assert risk.is_risk
            assert (risk.risk.status, risk.risk.uni_mmr, risk.risk.equity) == (
                "REDUCE_ONLY",
                1.05,
                1000.5,
            )
            assert (risk.risk.actual_equity, risk.risk.maint_margin) == (1001.0, 950.0)

    run(scenario)


# ---------------------------------------------------------------- the listenKey


def test_the_key_is_kept_alive_every_30_minutes(virtual: Virtual) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.settle()
            key = virtual.sim.listen_key("a")
            await virtual.at(3 * 3600 + 10)
            assert h.puts() == [(200, T0 + 1800 * k) for k in range(1, 7)]
            assert virtual.sim.listen_key("a") == key
            assert since(h.recorder.connected_at) == [0.0]
            assert h.weights == [1] * 7
            assert {r.endpoint for r in h.reports} == {"listen_key"}

    run(scenario)


def test_a_failed_keep_alive_is_retried_after_a_minute(virtual: Virtual) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.settle()
            virtual.sim.inject_fault("status", endpoint=LISTEN_KEY, count=1, status=503)
            await virtual.at(2 * 3600)
            # the key has 30 of its 60 minutes left: again after 1 minute, then every 30
            assert h.puts() == [
                (503, T0 + 1800),
                (200, T0 + 1860),
                (200, T0 + 3660),
                (200, T0 + 5460),
            ]
            assert [r.outcome for r in h.reports][1:3] == ["server_error", "success"]
            assert since(h.recorder.connected_at) == [0.0]

    run(scenario)


def test_minus_1125_on_keep_alive_gets_a_new_key_and_reconnects_at_once(
    virtual: Virtual,
) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.settle()
            old = virtual.sim.listen_key("a")
            await virtual.at(100)
            virtual.sim.stream_fault("forget_key", account="a")
            await virtual.at(1810)
            assert h.recorder.reasons == ["key_unknown"]
            assert since(h.recorder.ended_at) == [1800.0]
            assert since(h.recorder.connected_at) == [0.0, 1800.0]
            assert [(m, s) for m, s, _ in h.listen_key_calls()] == [
                ("POST", 200),
                ("PUT", 400),
                ("POST", 200),
            ]
            assert virtual.sim.listen_key("a") not in (None, old)
            virtual.sim.set_asset("a", "BTC", crossMarginFree="1")
            await virtual.settle()
            assert h.recorder.events, "no event on the new key"

    run(scenario)


def test_listen_key_expired_gets_a_new_key_and_reconnects_at_once(virtual: Virtual) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.at(600)
            old = virtual.sim.listen_key("a")
            virtual.sim.stream_fault("expire_key", account="a")
            await virtual.settle()
            assert h.recorder.kinds() == ["listenKeyExpired"]
            assert h.recorder.reasons == ["key_expired"]
            assert since(h.recorder.connected_at) == [0.0, 600.0]
            assert virtual.sim.listen_key("a") not in (None, old)
            assert [(m, since([t])[0]) for m, _, t in h.listen_key_calls()] == [
                ("POST", 0.0),
                ("POST", 600.0),
            ]

    run(scenario)


def test_a_key_left_to_expire_gets_a_new_one(virtual: Virtual) -> None:
    """No keep-alive gets through: the server expires the key at 60 minutes, says so on
    the connection, and the client opens a new key and reconnects at that second."""

    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.settle()
            virtual.sim.inject_fault("status", endpoint=LISTEN_KEY, status=503)
            await virtual.at(3610)
            # then the new key's POST fails too, and waits its backoff
            assert h.recorder.reasons[:2] == ["key_expired", "listen_key_failed"]
            assert since(h.recorder.ended_at)[:2] == [3600.0, 3600.0]
            virtual.sim.clear_faults()
            await virtual.at(3700)
            assert since(h.recorder.connected_at)[0] == 0.0
            assert h.recorder.connects == 2
            assert virtual.sim.listen_key("a") is not None

    run(scenario)


def test_expiry_after_expiry_backs_off(virtual: Virtual) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.at(600)
            virtual.sim.stream_fault("expire_key", account="a")
            await virtual.at(610)  # again, 10 s into the new connection
            virtual.sim.stream_fault("expire_key", account="a")
            await virtual.at(700)
            assert h.recorder.reasons == ["key_expired", "key_expired"]
            # the first at once (planned); the second is a second failure in a row
            (wait,) = jitters(2)
            assert since(h.recorder.connected_at) == approx([0.0, 600.0, 610.0 + wait])
            assert 1.0 <= wait <= 2.0

    run(scenario)


def test_a_429_on_the_listen_key_is_reported_and_retried_after_the_backoff(
    virtual: Virtual,
) -> None:
    async def scenario() -> None:
        virtual.sim.inject_fault("rate_limit", endpoint=LISTEN_KEY, count=1, retry_after=7)
        async with virtual.running() as h:
            await virtual.at(60)
            (failure,) = h.recorder.key_failures
            assert isinstance(failure, errors.RateLimited)
            assert failure.retry_after == 7
            assert h.recorder.reasons == ["listen_key_failed"]
            assert [(r.endpoint, r.outcome) for r in h.reports] == [
                ("listen_key", "rate_limited"),
                ("listen_key", "success"),
            ]
            (wait,) = jitters(1)
            assert [(m, s) for m, s, _ in h.listen_key_calls()] == [("POST", 429), ("POST", 200)]
            assert since([t for *_, t in h.listen_key_calls()]) == approx([0.0, wait])
            assert since(h.recorder.connected_at) == approx([wait])

    run(scenario)


def test_close_deletes_the_key(virtual: Virtual) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.at(60)
            assert virtual.sim.listen_key("a") is not None
            assert virtual.server.open_connections("a") == 1
        assert h.task.done()
        assert h.recorder.reasons == ["shutdown"]
        assert virtual.sim.listen_key("a") is None
        assert h.listen_key_calls()[-1] == ("DELETE", 200, T0 + 60)
        assert virtual.server.open_connections("a") == 0

    run(scenario)


def test_close_does_not_wait_for_a_paused_budget(virtual: Virtual) -> None:
    async def scenario() -> None:
        async def paused_for_good(weight: int) -> None:
            await asyncio.Event().wait()

        async with virtual.running(acquire=paused_for_good) as h:
            await virtual.settle()
        assert h.task.done()  # running() waited for it
        assert h.recorder.reasons == ["shutdown"]
        assert h.listen_key_calls() == []

    run(scenario)


def test_close_waits_for_the_delete_at_most_its_timeout(virtual: Virtual) -> None:
    async def scenario() -> None:
        timings = replace(DEFAULT_TIMINGS, delete_timeout_seconds=4.0)
        async with virtual.running(timings=timings) as h:
            await virtual.at(60)
            virtual.sim.inject_fault("stall", endpoint=LISTEN_KEY, seconds=3600)
        assert h.task.done()
        assert virtual.clock.now() == T0 + 64  # the DELETE's 4 s, then it gives up

    run(scenario)


# ---------------------------------------------------------------- drops and faults


def test_a_dropped_connection_reconnects_after_the_backoff_with_the_same_key(
    virtual: Virtual,
) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.at(30)
            virtual.sim.stream_fault("drop", account="a")
            await virtual.at(40)
            assert h.recorder.reasons == ["dropped"]
            (wait,) = jitters(1)
            assert 0.5 <= wait <= 1.0
            assert since(h.recorder.connected_at) == approx([0.0, 30.0 + wait])
            assert [m for m, _, _ in h.listen_key_calls()] == ["POST"]  # the same key

    run(scenario)


def test_a_connection_that_lived_a_minute_resets_the_backoff(virtual: Virtual) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            for at in (61, 200):  # each connection lived over a minute: a first failure
                await virtual.at(at)
                virtual.sim.stream_fault("drop", account="a")
            await virtual.at(210)
            virtual.sim.stream_fault("drop", account="a")  # 10 s old: a second in a row
            await virtual.at(300)
            first, second, third = jitters(1, 1, 2)
            assert since(h.recorder.connected_at) == approx(
                [0, 61 + first, 200 + second, 210 + third]
            )
            assert 1.0 <= third <= 2.0

    run(scenario)


def test_refused_upgrades_back_off_exponentially_up_to_the_cap(virtual: Virtual) -> None:
    async def scenario() -> None:
        virtual.sim.stream_fault("refuse_upgrades", count=10, status=503)
        async with virtual.running() as h:
            await virtual.at(1200)
            assert h.recorder.reasons == ["refused"] * 10
            waits = jitters(*range(1, 11))
            expected = [sum(waits[:n]) for n in range(11)]
            assert since(h.attempts) == approx(expected)
            steps = [1, 2, 4, 8, 16, 32, 64, 120, 120, 120]  # doubling, capped at 120 s
            for wait, step in zip(waits, steps, strict=True):
                assert step / 2 <= wait <= step
            assert since(h.recorder.connected_at) == approx([expected[-1]])
            assert virtual.server.refused == 10
            # a refused upgrade may mean a dead key: POST again (the same key while alive)
            assert [m for m, _, _ in h.listen_key_calls()].count("POST") == 11

    run(scenario)


def test_malformed_frames_and_unknown_events_are_ignored(virtual: Virtual) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.settle()
            virtual.sim.stream_fault("malformed", account="a")
            virtual.sim.stream_fault("malformed", account="a", body="[1, 2]")
            virtual.sim.stream_fault("unknown_event", account="a")
            virtual.sim.set_asset("a", "ETH", crossMarginLocked="1")
            await virtual.settle()
            assert h.recorder.rejected == ["malformed", "malformed"]
            assert h.recorder.kinds() == [OTHER, "outboundAccountPosition"]
            assert not h.recorder.events[0].moves_account
            assert h.recorder.reasons == []
            assert h.recorder.connects == 1

    run(scenario)


def test_a_1_mb_frame_closes_the_connection_and_the_stream_recovers(virtual: Virtual) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.at(100)
            virtual.sim.stream_fault("big_frame", account="a")
            await virtual.at(110)
            assert h.recorder.reasons == ["frame_too_big"]
            (wait,) = jitters(1)
            assert since(h.recorder.connected_at) == approx([0.0, 100 + wait])
            virtual.sim.set_asset("a", "ETH", crossMarginLocked="2")
            await virtual.settle()
            assert h.recorder.kinds() == ["outboundAccountPosition"]

    run(scenario)


def test_a_silent_server_is_detected_by_our_pings(virtual: Virtual) -> None:
    """Our ping every minute, unanswered for 30 s: the connection is failed then."""

    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.at(10)
            virtual.sim.stream_fault("silent", account="a")
            virtual.sim.set_asset("a", "ETH", crossMarginLocked="3")  # not sent: silent
            await virtual.at(91)
            assert h.recorder.reasons == ["ping_timeout"]
            assert since(h.recorder.ended_at) == [60.0 + 30.0]
            assert h.recorder.events == []
            virtual.sim.clear_faults()
            await virtual.at(300)
            (wait,) = jitters(1)  # the connection lived 90 s: a first failure
            assert since(h.recorder.connected_at) == approx([0.0, 90 + wait])
            assert h.recorder.reasons == ["ping_timeout"]

    run(scenario)


def test_the_servers_24_hour_close_reconnects(virtual: Virtual) -> None:
    async def scenario() -> None:
        # a client that would wait 25 h: the server's close at 24 h comes first
        timings = replace(DEFAULT_TIMINGS, max_connection_seconds=25 * 3600.0)
        async with virtual.running(timings=timings) as h:
            await virtual.at(24 * 3600 + 10)
            assert h.recorder.reasons == ["closed"]
            assert since(h.recorder.ended_at) == [24 * 3600.0]
            (wait,) = jitters(1)
            assert since(h.recorder.connected_at) == approx([0.0, 24 * 3600 + wait])

    run(scenario)


def test_we_reconnect_every_23_hours_and_keep_the_key_alive_every_30_minutes(
    virtual: Virtual,
) -> None:
    async def scenario() -> None:
        async with virtual.running() as h:
            await virtual.at(48 * 3600 + 10)
            day = 23 * 3600.0
            assert h.recorder.reasons == ["max_age", "max_age"]
            assert since(h.recorder.ended_at) == [day, 2 * day]
            assert since(h.recorder.connected_at) == [0.0, day, 2 * day]  # at once: planned
            assert h.puts() == [(200, T0 + 1800 * k) for k in range(1, 97)]
            assert [m for m, _, _ in h.listen_key_calls()].count("POST") == 1  # one key
            assert virtual.server.accepted("a") == 3
            assert virtual.server.open_connections("a") == 1

    run(scenario)


def test_streams_of_one_egress_share_the_pacer(virtual: Virtual) -> None:
    async def scenario() -> None:
        clock = virtual.clock
        pacer = ConnectPacer(1, 3600.0, clock=clock, sleep=clock.sleep)  # one an hour
        async with (
            virtual.running("a", pacer=pacer) as a,
            virtual.running("b", pacer=pacer) as b,
        ):
            await virtual.at(3599)
            assert (a.recorder.connects, b.recorder.connects) == (1, 0)
            await virtual.at(3601)
            assert since(a.attempts + b.attempts) == [0.0, 3600.0]
            assert b.recorder.connects == 1

    run(scenario)


def test_no_listen_key_or_api_key_in_logs_reprs_or_errors(
    virtual: Virtual, caplog: pytest.LogCaptureFixture
) -> None:
    keys: list[str] = []
    failures: list[str] = []
    sim = virtual.sim

    async def scenario() -> None:
        sim.stream_fault("refuse_upgrades", count=1, status=400)
        sim.inject_fault("api_error", endpoint=LISTEN_KEY, count=1, code=-1000)
        async with virtual.running() as h:
            await virtual.at(60)
            keys.append(sim.listen_key("a") or "")
            sim.stream_fault("expire_key", account="a")
            await virtual.at(120)
            keys.append(sim.listen_key("a") or "")
            sim.stream_fault("malformed", account="a", body=f'{{"e": 1, "k": "{keys[-1]}"}}')
            sim.stream_fault("drop", account="a")
            await virtual.at(180)
            assert h.recorder.connects == 3
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


# ---------------------------------------------------------------- over a real WebSocket

#: backoffs of a few ms, for the scenarios in wall time
FAST = StreamTimings(backoff_initial_seconds=0.01, backoff_cap_seconds=0.05)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(sim_accounts(), stream_ping_interval=0.05) as sim:
        yield sim


def real(
    sim: Simulator,
    account: str = "a",
    *,
    timings: StreamTimings = FAST,
    route: Route = DEFAULT,
) -> contextlib.AbstractAsyncContextManager[Harness]:
    """The stream over loopback: the simulator's HTTP server and WebSocket server."""
    return client_of(
        sim,
        account,
        base_url=sim.url,
        stream_url=sim.stream_url,
        connect=websocket_connect,
        clock=SYSTEM_CLOCK.now,  # production's: a real WebSocket runs in wall time
        sleep=SYSTEM_CLOCK.sleep,
        pacer=ConnectPacer(),
        timings=timings,
        until_closed=_within_10_seconds,
        route=route,
    )


async def _within_10_seconds(task: "asyncio.Task[None]") -> None:
    await asyncio.wait_for(task, 10)


async def until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Wait in wall time, off the loop, for what the loop and the server's threads do."""
    await asyncio.to_thread(wait_until, condition, timeout, what, 0.01)


async def connected(h: Harness, times: int = 1) -> None:
    await until(lambda: h.recorder.connects >= times, f"connection {times}")
    await until(lambda: h.sim.stream.open_connections(h.stream.account) >= 1, "the server's side")


def test_over_a_real_websocket_each_end_is_told_apart(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    """What `websockets` reports (pongs, close codes, a size cap, a ping timeout) maps to
    the same reasons as the in-process pair gives; the handshake logs no key."""
    keys: list[str] = []
    timings = replace(
        FAST, ping_interval_seconds=0.05, ping_timeout_seconds=0.1, close_timeout_seconds=0.1
    )

    async def scenario() -> None:
        async with real(sim, timings=timings) as h:
            await connected(h)
            keys.append(sim.listen_key("a") or "")
            await until(lambda: sim.stream.pongs("a") >= 3, "three pongs to the server's pings")
            sim.set_asset("a", "USDT", crossMarginFree="-3", negativeBalance="3")
            await until(lambda: "balanceUpdate" in h.recorder.kinds(), "the events")
            sim.stream_fault("big_frame", account="a")
            await connected(h, 2)
            sim.stream_fault("drop", account="a")
            await connected(h, 3)
            sim.stream_fault("expire_key", account="a")
            await connected(h, 4)
            keys.append(sim.listen_key("a") or "")
            sim.stream_fault("max_age", seconds=0.2)
            await connected(h, 5)
            sim.stream_fault("max_age", seconds=24 * 3600)
            sim.stream_fault("silent", account="a")
            await until(lambda: "ping_timeout" in h.recorder.reasons, "the ping timeout")
            pongs = sim.stream.pongs("a")
            sim.clear_faults()
            await until(lambda: sim.stream.pongs("a") > pongs + 1, "pongs again")
            sim.set_asset("a", "ETH", crossMarginLocked="2")
            await until(lambda: h.recorder.kinds().count("outboundAccountPosition") >= 2, "back")
            reasons = h.recorder.reasons
            assert reasons[:3] == ["frame_too_big", "dropped", "key_expired"]
            assert {"closed", "ping_timeout"} <= set(reasons)

    caplog.set_level(logging.DEBUG)
    with captured_logs() as logs, structlog.testing.capture_logs() as structured:
        run(scenario)
    assert all(keys)
    text = "\n".join([*logs.lines, caplog.text, json.dumps(structured, default=str)])
    for secret in [*keys, API_KEYS["a"]]:
        assert secret not in text


def test_each_stream_connects_from_its_source_address(sim: Simulator) -> None:
    async def scenario() -> None:
        async with (
            real(sim, "a", route=Route(source_address="127.0.0.2")) as a,
            real(sim, "b", route=Route(source_address="127.0.0.3")) as b,
        ):
            await connected(a)
            await connected(b)
        assert sim.stream.peers("a") == ["127.0.0.2"]
        assert sim.stream.peers("b") == ["127.0.0.3"]
        by_account = {(r.account, r.client_ip) for r in sim.requests}
        assert by_account == {("a", "127.0.0.2"), ("b", "127.0.0.3")}

    run(scenario)


def test_the_stream_goes_through_the_accounts_proxy(sim: Simulator) -> None:
    proxy = RecordingProxy({"user": ("proxy-s3cret", "127.0.0.3")})

    async def scenario() -> None:
        route = Route(proxy.url("user"), "127.0.0.2")
        async with real(sim, route=route) as h:
            await connected(h)

    with proxies.running(proxy):
        run(scenario)
    # a CONNECT tunnel, reached from the source address, with the proxy's credentials
    assert proxy.seen == [Seen("127.0.0.2", "user", "proxy-s3cret", None, "CONNECT")]
    assert sim.stream.peers("a") == ["127.0.0.3"]  # the proxy's own egress


def test_the_stream_goes_through_a_socks5_proxy(sim: Simulator) -> None:
    proxy = Socks5Proxy("127.0.0.3")

    async def scenario() -> None:
        async with real(sim, route=Route(proxy.url, "127.0.0.2")) as h:
            await connected(h)

    with proxies.running(proxy):
        run(scenario)
    host, port = sim.stream.address
    assert proxy.requests == [(f"{host}:{port}", "user:socks-s3cret", "127.0.0.2")]
    assert sim.stream.peers("a") == ["127.0.0.3"]


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
