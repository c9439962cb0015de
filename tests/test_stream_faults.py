"""The user data stream's fault matrix: the real exporter against the simulator, with
Binance's stream timings (30-minute keep-alive, backoff 1 s doubling to 120 s, pings
every minute).

Each fault hits one of two accounts' streams (the simulator's max age hits both). In each:
REST polling of every account goes on (the simulator's request log), the other stream
stays up, `binance_pm_stream_up` says 0 while a fault keeps the stream down and 1 after,
the reconnect is counted under its reason, every wait between attempts is within the
backoff cap, and no API key, secret or listenKey is in the logs or on /metrics.

The matrix runs in-process on one virtual clock (`Exporter(clock=, transport=,
stream_connect=)`: REST through `SimTransport`, the stream through `SimStream`), so each
fault's effect is checked at the virtual second it is due. One test keeps the real
WebSocket over loopback: each stream leaving by its account's route (a source address,
a proxy), which only a socket shows. Exporter shutdown deleting the keys is in
test_stream_wiring.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass

import pytest
from conftest import VIRTUAL_START
from prometheus_client import generate_latest
from support.faultkit import LogLines, captured_logs, secret_forms
from support.harness import RunningExporter, accounts, reference_registry, sim_config
from support.metrics import parse_metrics
from support.proxies import RecordingProxy, running
from support.waits import wait_until

from exporter.app import Exporter
from exporter.binance.stream import DEFAULT_TIMINGS, StreamTimings
from exporter.simulator import Simulator
from exporter.simulator.demo import GeneratedAccount
from exporter.simulator.memstream import SimStream
from exporter.simulator.transport import SimTransport
from exporter.simulator.virtualtime import EventClock

FAULTY, OTHER = "acct-00", "acct-01"
NAMES = (FAULTY, OTHER)
LISTEN_KEY = "/papi/v1/listenKey"
T0 = VIRTUAL_START
#: every account refreshed every 20 s: the weight never binds
BUDGET = {"ip_weight_limit_per_minute": 60_000, "share": 1.0, "min_interval_seconds": 20}
#: when each fault is injected: the first connections lived over a minute (stable)
INJECT = 65.0
#: the longest wait between two attempts (the cap), and then some for the reconnect
BACK_WITHIN = DEFAULT_TIMINGS.backoff_cap_seconds + 10


@dataclass(frozen=True)
class Case:
    """A fault on FAULTY's stream and what the exporter must show of it."""

    inject: Callable[[Simulator], None]
    #: the reasons its reconnects are counted under
    reasons: tuple[str, ...]
    #: seconds after T0 by when they are counted
    counted_at: float = INJECT
    #: the fault shows nothing until then (seconds after T0): the stream stays up
    unseen_until: float | None = None
    #: the stream stays down until the fault is ended
    holds: bool = False
    #: the pause of the route it causes (listenKey calls share the accounts' egress)
    pause: str | None = None
    #: how the fault ends
    end: Callable[[Simulator], None] = Simulator.clear_faults
    #: every account's stream is hit (the simulator's max age applies to every connection)
    everyone: bool = False


def refuse_upgrades(sim: Simulator) -> None:
    sim.stream_fault("refuse_upgrades")  # every upgrade: only the dropped stream asks
    sim.stream_fault("drop", account=FAULTY)


def rate_limit_listen_key(sim: Simulator) -> None:
    sim.inject_fault("rate_limit", endpoint=LISTEN_KEY, account=FAULTY, retry_after=1)
    sim.stream_fault("expire_key", account=FAULTY)  # the next POST gets the 429


def ban_listen_key(sim: Simulator) -> None:
    until_ms = sim.state.now_ms() + 1000
    sim.inject_fault("ban", endpoint=LISTEN_KEY, account=FAULTY, until_ms=until_ms, retry_after=1)
    sim.stream_fault("expire_key", account=FAULTY)


def on_faulty(kind: str, **params: object) -> Callable[[Simulator], None]:
    """The simulator's stream fault `kind` on FAULTY's connections."""
    return lambda sim: sim.stream_fault(kind, account=FAULTY, **params)


def close_at(seconds: float) -> Callable[[Simulator], None]:
    """The simulator closes every connection at this age, as Binance does at 24 h."""
    return lambda sim: sim.stream_fault("max_age", seconds=seconds)


CASES = {
    "upgrade_refused": Case(refuse_upgrades, ("dropped", "refused"), INJECT + 1, holds=True),
    "dropped": Case(on_faulty("drop"), ("dropped",)),
    # The simulator stops reading: no pongs. Our ping at 120 s goes unanswered for 30 s;
    # a reconnect is just as silent until the fault ends.
    "silent": Case(on_faulty("silent"), ("ping_timeout",), 150, unseen_until=149),
    "listen_key_expired": Case(on_faulty("expire_key"), ("key_expired",)),
    # the key vanishes quietly: the next keep-alive, at 30 minutes, gets -1125
    "keep_alive_1125": Case(
        on_faulty("forget_key"), ("key_unknown",), 1800.01, unseen_until=1799.99
    ),
    "listen_key_429": Case(
        rate_limit_listen_key,
        ("key_expired", "listen_key_failed"),
        holds=True,
        pause="rate_limited",
    ),
    "listen_key_418": Case(
        ban_listen_key, ("key_expired", "listen_key_failed"), holds=True, pause="banned"
    ),
    "frame_1_mb": Case(on_faulty("big_frame"), ("frame_too_big",)),
    # the connections opened at 0 s (and 1 ms later): closed at 600 s
    "24h_close": Case(
        close_at(600),
        ("closed",),
        600.01,
        unseen_until=599.99,
        end=close_at(24 * 3600),
        everyone=True,
    ),
}


@dataclass
class Setup:
    sim: Simulator
    clock: EventClock
    exporter: Exporter
    logs: LogLines
    generated: list[GeneratedAccount]

    async def at(self, seconds: float) -> None:
        """Run the exporter and the simulator until `seconds` after T0."""
        await self.clock.run_to(T0 + seconds)

    def metrics(self) -> str:
        return generate_latest(reference_registry(self.exporter)).decode()

    def value(self, name: str, **labels: str) -> float:
        """A series on /metrics; 0 when absent (a counter never incremented)."""
        return self.exporter.registry.get_sample_value(name, labels) or 0.0

    def stream_up(self, account: str) -> float | None:
        return self.exporter.registry.get_sample_value("binance_pm_stream_up", {"account": account})

    def reconnects(self, account: str, reason: str | None = None) -> float:
        """The account's reconnects for `reason`, or for every reason."""
        return sum(
            value
            for (name, labels), value in parse_metrics(self.metrics()).items()
            if name == "binance_pm_stream_reconnects_total"
            and ("account", account) in labels
            and (reason is None or ("reason", reason) in labels)
        )

    def polled_since(self, since: float, names: Iterable[str] = NAMES) -> bool:
        """Every account in `names` got a successful balance request since `since`
        seconds after T0."""
        polled = {
            r.account
            for r in self.sim.requests
            if r.path == "/papi/v1/balance" and r.status == 200 and r.time > T0 + since
        }
        return set(names) <= polled

    def all_up(self) -> bool:
        return all(self.stream_up(name) == 1 for name in NAMES) and self.polled_since(0)

    async def event_arrives(self, account: str) -> None:
        """A balance change on `account` reaches the exporter on its stream at once."""
        before = self.value(
            "binance_pm_stream_events_total", account=account, event="balanceUpdate"
        )
        asset = self.sim.balances(account)[0]["asset"]
        self.sim.set_asset(account, asset, crossMarginFree="7")
        await self.clock.settle()
        after = self.value("binance_pm_stream_events_total", account=account, event="balanceUpdate")
        assert after == before + 1, f"no event on {account}'s stream"

    def assert_no_secret(self, listen_keys: Iterable[str | None], *more: str) -> None:
        """No API key, API secret, listenKey (nor `more`) in the logs or on /metrics."""
        secrets = [s for g in self.generated for k, s in g.config.items() if k != "name"]
        secrets += [key for key in listen_keys if key] + list(more)
        text = "\n".join([*self.logs.lines, self.metrics()])
        assert self.logs.lines, "nothing logged: the check below would check nothing"
        leaked = [form for secret in secrets for form in secret_forms(secret) if form in text]
        assert leaked == []

    def assert_backoffs_capped(self) -> None:
        waits = [e["in_seconds"] for e in self.logs.events("stream_reconnecting")]
        assert all(0 <= wait <= DEFAULT_TIMINGS.backoff_cap_seconds for wait in waits), waits


@contextlib.asynccontextmanager
async def started(clock: EventClock) -> AsyncIterator[Setup]:
    """Two accounts polled every 20 s, their streams up, all in-process on `clock`; the
    scenario starts 20 s in."""
    generated = accounts(len(NAMES))
    sim = Simulator([g.sim_account for g in generated], clock=clock, ip_weight_limit=60_000)
    server = SimStream(sim.state, clock)
    config = sim_config("http://sim.test", generated, BUDGET, stream_url=server.url)
    with captured_logs() as logs:
        exporter = Exporter(
            config,
            clock=clock,
            transport=SimTransport(sim.state, clock),
            stream_connect=server.connect,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(exporter.run(stop))
        setup = Setup(sim, clock, exporter, logs, generated)
        try:
            await clock.run_to(T0 + 20)  # the round-robin spreads the first polls
            assert setup.all_up(), "both streams up, both accounts polled"
            yield setup
        finally:
            stop.set()
            await clock.run(task)


def run(clock: EventClock, scenario: Callable[[Setup], object]) -> None:
    async def go() -> None:
        async with started(clock) as setup:
            await scenario(setup)  # type: ignore[misc]

    asyncio.run(go())


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_fault_on_one_stream(clock: EventClock, case: Case) -> None:
    """Down (and shown down) while the fault lasts, REST polling on, back after it."""

    async def scenario(s: Setup) -> None:
        hit = NAMES if case.everyone else (FAULTY,)
        keys = [s.sim.listen_key(name) for name in NAMES]
        counted = {(n, r): s.reconnects(n, r) for n in hit for r in case.reasons}

        def reasons_counted() -> bool:
            return all(s.reconnects(n, r) > before for (n, r), before in counted.items())

        await s.at(INJECT)
        case.inject(s.sim)
        if case.unseen_until is not None:
            await s.at(case.unseen_until)
            assert not reasons_counted(), "counted before it was due"
            assert s.stream_up(FAULTY) == 1
        await s.at(case.counted_at)
        assert reasons_counted()
        if case.holds:
            for k in range(1, 6):  # 5 minutes of the fault: down all along, REST polled
                await s.at(case.counted_at + 60 * k)
                assert s.stream_up(FAULTY) == 0, f"up {60 * k} s into the fault"
                assert s.polled_since(case.counted_at + 60 * (k - 1))
        if case.pause is not None:
            assert s.value("binance_pm_pauses_total", egress="default", reason=case.pause) >= 1
        case.end(s.sim)
        ended = s.clock.now() - T0
        await s.at(ended + BACK_WITHIN)
        assert s.stream_up(FAULTY) == 1, "the stream back"
        await s.event_arrives(FAULTY)
        assert s.polled_since(ended)
        if not case.everyone:
            assert s.stream_up(OTHER) == 1
            assert s.reconnects(OTHER) == 0
        if {"key_expired", "key_unknown"} & set(case.reasons):
            assert s.sim.listen_key(FAULTY) not in (None, keys[0])
        s.assert_backoffs_capped()
        s.assert_no_secret([*keys, *(s.sim.listen_key(name) for name in NAMES)])

    run(clock, scenario)


def test_malformed_frames_and_unknown_events_leave_the_stream_up(clock: EventClock) -> None:
    async def scenario(s: Setup) -> None:
        key = s.sim.listen_key(FAULTY)
        await s.at(INJECT)
        s.sim.stream_fault("malformed", account=FAULTY)
        s.sim.stream_fault("malformed", account=FAULTY, body=f'{{"e": 1, "listenKey": "{key}"}}')
        s.sim.stream_fault("unknown_event", account=FAULTY)
        await s.event_arrives(FAULTY)  # sent after them: they have been read
        # one line a minute, however many frames: the metric counts each of them
        assert len(s.logs.events("stream_frame_rejected", account=FAULTY)) == 1
        assert s.value("binance_pm_stream_frames_rejected_total", account=FAULTY) == 2
        assert s.value("binance_pm_stream_events_total", account=FAULTY, event="other") == 1
        await s.at(INJECT + 30)
        assert [s.stream_up(name) for name in NAMES] == [1, 1]
        assert [s.reconnects(name) for name in NAMES] == [0, 0]
        assert s.polled_since(INJECT)
        s.assert_no_secret([key, s.sim.listen_key(OTHER)])

    run(clock, scenario)


def test_a_429_on_keep_alive_pauses_the_route_and_leaves_the_stream_up(
    clock: EventClock,
) -> None:
    """The key is still good: the stream stays connected, the route waits out the 429
    like after any request, the keep-alive is retried a minute later, and REST polling
    of both accounts resumes after the pause."""

    async def scenario(s: Setup) -> None:
        key = s.sim.listen_key(FAULTY)
        await s.at(INJECT)
        s.sim.inject_fault("rate_limit", endpoint=LISTEN_KEY, account=FAULTY, retry_after=1)
        await s.at(1800)  # the first keep-alive
        assert s.value("binance_pm_pauses_total", egress="default", reason="rate_limited") == 1
        s.sim.clear_faults()
        await s.at(1900)
        puts = [
            (r.status, r.time - T0)
            for r in s.sim.requests
            if r.path == LISTEN_KEY and r.method == "PUT" and r.account == FAULTY
        ]
        assert puts == [(429, 1800.0), (200, 1860.0)]
        assert s.polled_since(1801)
        assert [s.stream_up(name) for name in NAMES] == [1, 1]
        assert [s.reconnects(name) for name in NAMES] == [0, 0]
        assert s.sim.listen_key(FAULTY) == key  # kept alive, not replaced
        await s.event_arrives(FAULTY)
        s.assert_no_secret([key, s.sim.listen_key(OTHER)])

    run(clock, scenario)


# ---------------------------------------------------------------- over a real WebSocket

#: short backoffs: this one runs in wall time
SHORT = StreamTimings(backoff_initial_seconds=0.1, backoff_cap_seconds=0.4)
#: a deadline for what takes a backoff or a refresh on an idle machine, for a loaded one
DEADLINE = 15.0


@dataclass
class RealSetup:
    sim: Simulator
    exporter: RunningExporter
    logs: LogLines
    generated: list[GeneratedAccount]

    def value(self, name: str, **labels: str) -> float:
        return self.exporter.sample(name, **labels) or 0.0

    def stream_up(self, account: str) -> float | None:
        return self.exporter.sample("binance_pm_stream_up", account=account)

    def reconnects(self, account: str, reason: str) -> float:
        return sum(
            value
            for (name, labels), value in parse_metrics(self.exporter.metrics_text()).items()
            if name == "binance_pm_stream_reconnects_total"
            and ("account", account) in labels
            and ("reason", reason) in labels
        )

    def polled_since(self, since: float) -> bool:
        polled = {
            r.account
            for r in self.sim.requests
            if r.path == "/papi/v1/balance" and r.status == 200 and r.time > since
        }
        return set(NAMES) <= polled

    def event_arrives(self, account: str) -> None:
        before = self.value(
            "binance_pm_stream_events_total", account=account, event="balanceUpdate"
        )
        asset = self.sim.balances(account)[0]["asset"]
        self.sim.set_asset(account, asset, crossMarginFree="7")
        wait_until(
            lambda: (
                self.value("binance_pm_stream_events_total", account=account, event="balanceUpdate")
                > before
            ),
            DEADLINE,
            f"an event on {account}'s stream",
            step=0.05,
        )

    def assert_no_secret(self, listen_keys: Iterable[str | None], *more: str) -> None:
        secrets = [s for g in self.generated for k, s in g.config.items() if k != "name"]
        secrets += [key for key in listen_keys if key] + list(more)
        text = "\n".join([*self.logs.lines, self.exporter.metrics_text()])
        assert self.logs.lines, "nothing logged: the check below would check nothing"
        leaked = [form for secret in secrets for form in secret_forms(secret) if form in text]
        assert leaked == []


@contextlib.contextmanager
def started_over_loopback(extra: dict[str, dict[str, str]]) -> Iterator[RealSetup]:
    """Two accounts polled every second over loopback, their streams up on SHORT."""
    generated = accounts(len(NAMES))
    with (
        Simulator([g.sim_account for g in generated], ip_weight_limit=60_000) as sim,
        captured_logs() as logs,
    ):
        budget = {**BUDGET, "min_interval_seconds": 1}
        config = sim_config(sim.url, generated, budget, extra=extra, stream_url=sim.stream_url)
        with RunningExporter(config, stream_timings=SHORT) as exporter:
            setup = RealSetup(sim, exporter, logs, generated)
            wait_until(
                lambda: all(setup.stream_up(n) == 1 for n in NAMES) and setup.polled_since(0),
                DEADLINE,
                "both streams up, both accounts polled",
                step=0.05,
            )
            yield setup


@pytest.mark.slow
def test_each_stream_leaves_by_its_accounts_route() -> None:
    """FAULTY from its source address, OTHER through its proxy (a CONNECT tunnel out of
    127.0.0.3); after a drop each reconnects by the same way."""
    password = "pw-stream-s3cr3t-01"
    proxy = RecordingProxy({"user-stream-01": (password, "127.0.0.3")})
    exits = {FAULTY: "127.0.0.2", OTHER: "127.0.0.3"}
    with running(proxy):
        extra = {
            FAULTY: {"source_address": exits[FAULTY]},
            OTHER: {"proxy": proxy.url("user-stream-01")},
        }
        with started_over_loopback(extra) as s:
            since = time.time()
            for name in NAMES:
                s.sim.stream_fault("drop", account=name)
            wait_until(
                lambda: all(s.reconnects(n, "dropped") == 1 and s.stream_up(n) == 1 for n in NAMES),
                DEADLINE,
                "both streams back",
                step=0.05,
            )
            for name in NAMES:
                s.event_arrives(name)
            wait_until(lambda: s.polled_since(since), DEADLINE, "REST polling since the drops")
            for name, ip in exits.items():
                assert s.sim.stream.peers(name) == [ip, ip]
                assert {r.client_ip for r in s.sim.requests if r.account == name} == {ip}
            tunnels = [seen for seen in proxy.seen if seen.method == "CONNECT"]
            assert [(t.client_ip, t.user, t.password) for t in tunnels] == [
                ("127.0.0.1", "user-stream-01", password)
            ] * 2
            s.assert_no_secret([s.sim.listen_key(name) for name in NAMES], password)
