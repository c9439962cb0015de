"""The simulator's user data stream in-process (exporter/simulator/memstream.py): it
accepts and refuses as the WebSocket server does, and each fault ends a connection the
way a `websockets` client connection ends, at its exact virtual second."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from conftest import VIRTUAL_START
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from exporter.binance.stream import DEFAULT_TIMINGS
from exporter.route import Route
from exporter.simulator import SimAccount, Simulator
from exporter.simulator.memstream import MemConnection, SimStream
from exporter.simulator.virtualtime import EventClock

T0 = VIRTUAL_START


class Pair:
    def __init__(self, clock: EventClock) -> None:
        self.clock = clock
        self.sim = Simulator([SimAccount.hmac("a", "key-a", "secret-a")], clock=clock)
        self.server = SimStream(self.sim.state, clock)

    def key(self) -> str:
        return self.sim.state.listen_keys.open("a", self.sim.state.now_ms())

    async def connect(self, key: str, route: Route = Route()) -> MemConnection:
        return await self.server.connect(f"{self.server.url}/{key}", route, DEFAULT_TIMINGS)


def run(clock: EventClock, scenario: Callable[[Pair], Awaitable[None]]) -> None:
    asyncio.run(scenario(Pair(clock)))


async def frames_until_end(
    pair: Pair, connection: MemConnection
) -> tuple[list[str], float, BaseException | None]:
    """Every frame the connection yields, when it ended (seconds after T0), and how:
    None when iteration stopped (a normal close), else the exception it raised."""
    frames: list[str] = []

    async def read() -> BaseException | None:
        try:
            async for frame in connection:
                frames.append(str(frame))
        except ConnectionClosedError as error:
            return error
        return None

    how = await pair.clock.run(read())
    return frames, pair.clock.now() - T0, how


def test_it_refuses_as_the_server_does(clock: EventClock) -> None:
    async def scenario(pair: Pair) -> None:
        for url, status in [("ws://sim.test/elsewhere", 404), (f"{pair.server.url}/nope", 400)]:
            with pytest.raises(InvalidStatus) as refused:
                await pair.server.connect(url, Route(), DEFAULT_TIMINGS)
            assert refused.value.response.status_code == status
            assert b"nope" not in refused.value.response.body  # never echo the key
        pair.sim.stream_fault("refuse_upgrades", count=2, status=503)
        key = pair.key()
        for _ in range(2):
            with pytest.raises(InvalidStatus, match="503"):
                await pair.connect(key)
        await pair.connect(key, Route(source_address="127.0.0.2"))
        await pair.connect(key)
        assert pair.server.refused == 2
        assert pair.server.accepted("a") == 2
        assert pair.server.peers("a") == ["127.0.0.2", "127.0.0.1"]
        assert pair.server.open_connections("a") == 2

    run(clock, scenario)


def test_events_arrive_and_close_ends_the_connection(clock: EventClock) -> None:
    async def scenario(pair: Pair) -> None:
        connection = await pair.connect(pair.key())
        pair.sim.set_asset("a", "BTC", crossMarginFree="1")
        pair.sim.stream_fault("unknown_event", account="a")
        first = json.loads(await connection.recv())
        assert first["e"] == "outboundAccountPosition"
        await connection.close()
        assert pair.server.open_connections() == 0
        frames, _, how = await frames_until_end(pair, connection)
        assert (frames, how) == ([], None)  # our close: a normal one, iteration stops

    run(clock, scenario)


@pytest.mark.parametrize(
    ("fault", "sent", "received"),
    [("drop", None, None), ("big_frame", 1009, 1009)],
)
def test_a_fault_ends_it_with_websockets_close_codes(
    clock: EventClock, fault: str, sent: int | None, received: int | None
) -> None:
    async def scenario(pair: Pair) -> None:
        connection = await pair.connect(pair.key())
        pair.sim.stream_fault(fault, account="a")
        _, at, how = await frames_until_end(pair, connection)
        assert isinstance(how, ConnectionClosedError)
        assert (how.sent and how.sent.code, how.rcvd and how.rcvd.code) == (sent, received)
        assert at == 0.0
        assert pair.server.open_connections() == 0

    run(clock, scenario)


def test_silence_fails_it_after_a_ping_interval_and_timeout(clock: EventClock) -> None:
    async def scenario(pair: Pair) -> None:
        connection = await pair.connect(pair.key())
        pair.sim.stream_fault("silent", account="a")
        pair.sim.set_asset("a", "BTC", crossMarginFree="1")  # not sent
        frames, at, how = await frames_until_end(pair, connection)
        assert frames == []
        assert isinstance(how, ConnectionClosedError)
        assert how.sent is not None
        assert how.sent.code == 1011
        timings = DEFAULT_TIMINGS
        assert at == timings.ping_interval_seconds + timings.ping_timeout_seconds
        # opened while silent: its first ping, a minute in, goes unanswered too
        again = await pair.connect(pair.key())
        _, at_again, how = await frames_until_end(pair, again)
        assert isinstance(how, ConnectionClosedError)
        assert at_again == at + timings.ping_interval_seconds + timings.ping_timeout_seconds

    run(clock, scenario)


@pytest.mark.parametrize(
    ("setup", "closed_at", "last_event"),
    [
        (lambda sim: None, 24 * 3600.0, None),  # the server's maximum age
        (lambda sim: sim.stream_fault("max_age", seconds=90), 90.0, None),
        # no keep-alive: the key expires at 60 minutes, said on the connection
        (lambda sim: None, 3600.0, "listenKeyExpired"),
    ],
    ids=["24h", "max_age_fault", "key_ttl"],
)
def test_the_server_closes_it_exactly_when_due(
    clock: EventClock,
    setup: Callable[[Simulator], None],
    closed_at: float,
    last_event: str | None,
) -> None:
    async def scenario(pair: Pair) -> None:
        key = pair.key()
        connection = await pair.connect(key)
        if last_event is None:  # keep the key alive every 30 minutes, as a client does

            async def keep_alive() -> None:
                while True:
                    await clock.sleep(1800)
                    pair.sim.state.listen_keys.extend("a", pair.sim.state.now_ms(), key)

            asyncio.get_running_loop().create_task(keep_alive())
        setup(pair.sim)
        frames, at, how = await frames_until_end(pair, connection)
        assert how is None  # a close 1000: iteration stops
        assert at == closed_at
        assert [json.loads(f)["e"] for f in frames][-1:] == ([last_event] if last_event else [])

    run(clock, scenario)
