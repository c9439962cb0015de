"""The simulator's user data stream over real loopback: listenKeys, events, pings, faults.

The simulator's clock is injected, so a key's 60 minutes and a connection's 24 hours
pass by moving it, not by waiting.
"""

import json
import random
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from support.waits import wait_until
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from exporter.simulator import SimAccount, Simulator
from exporter.simulator.demo import Drift
from exporter.simulator.virtualtime import EventClock

LISTEN_KEY = "/papi/v1/listenKey"
KEYS = {"a": "key-a", "b": "key-b"}


@pytest.fixture
def clock() -> EventClock:
    """The virtual clock from now: the events' times are compared with the wall clock's."""
    return EventClock(time.time())


@pytest.fixture
def sim(clock: EventClock) -> Iterator[Simulator]:
    accounts = [SimAccount.hmac(name, key, f"secret-{name}") for name, key in KEYS.items()]
    with Simulator(accounts, clock=clock, stream_ping_interval=0.05) as sim:
        yield sim


def listen_key(sim: Simulator, method: str = "POST", api_key: str | None = "key-a") -> Any:
    headers = {"X-MBX-APIKEY": api_key} if api_key is not None else {}
    return httpx.request(method, sim.url + LISTEN_KEY, headers=headers)


def open_stream(sim: Simulator, account: str = "a") -> ClientConnection:
    key = listen_key(sim, api_key=KEYS[account]).json()["listenKey"]
    ws = connect(f"{sim.stream_url}/{key}", max_size=None, max_queue=None, proxy=None)
    wait_until(lambda: sim.stream.open_connections(account), what="the connection registered")
    return ws


def events(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [json.loads(ws.recv(timeout=5)) for _ in range(count)]


# ---------------------------------------------------------------- listenKey endpoints


@pytest.mark.slow
def test_listen_key_calls_need_an_api_key_and_weigh_one_each(sim: Simulator) -> None:
    assert listen_key(sim, api_key=None).json()["code"] == -2014
    assert listen_key(sim, api_key="unknown").json()["code"] == -2015
    before = sim.weight_used()
    first = listen_key(sim).json()["listenKey"]
    assert listen_key(sim).json()["listenKey"] == first  # the same key, extended
    assert listen_key(sim, "PUT").json() == {}
    assert listen_key(sim, "DELETE").json() == {}
    assert sim.weight_used() == before + 4
    assert [r.weight for r in sim.requests[-4:]] == [1, 1, 1, 1]
    assert listen_key(sim, "GET").status_code == 405


@pytest.mark.slow
def test_keys_live_60_minutes_of_the_simulators_clock(sim: Simulator, clock: EventClock) -> None:
    key = listen_key(sim).json()["listenKey"]
    clock.time += 59 * 60
    assert listen_key(sim, "PUT").json() == {}  # extended: 60 more minutes from now
    clock.time += 59 * 60
    assert listen_key(sim).json()["listenKey"] == key  # POST on a live key: the same one
    clock.time += 60 * 60
    reply = listen_key(sim, "PUT")
    assert reply.status_code == 400
    assert reply.json() == {"code": -1125, "msg": "This listenKey does not exist."}
    assert listen_key(sim).json()["listenKey"] != key


def test_put_names_a_key_that_is_not_the_accounts(sim: Simulator) -> None:
    listen_key(sim)
    reply = httpx.put(
        sim.url + LISTEN_KEY, params={"listenKey": "other"}, headers={"X-MBX-APIKEY": "key-a"}
    )
    assert reply.json()["code"] == -1125
    assert listen_key(sim, "DELETE").json() == {}
    assert listen_key(sim, "PUT").json()["code"] == -1125


# ---------------------------------------------------------------- events


@pytest.mark.slow
def test_a_balance_change_pushes_position_and_balance_update(sim: Simulator) -> None:
    with open_stream(sim, "a") as a, open_stream(sim, "b") as b:
        sim.set_asset("a", "USDT", crossMarginFree="10.5", negativeBalance="0")
        position, update = events(a, 2)
        assert position["e"] == "outboundAccountPosition"
        assert set(position) == {"e", "E", "u", "U", "B"}
        assert position["B"] == [{"a": "USDT", "f": "10.5", "l": position["B"][0]["l"]}]
        assert update["e"] == "balanceUpdate"
        assert set(update) == {"e", "E", "a", "d", "U", "T"}
        assert isinstance(update["E"], int)
        assert abs(update["E"] - time.time() * 1000) < 60_000
        with pytest.raises(TimeoutError):
            b.recv(timeout=0.2)  # another account's stream hears nothing


def test_admin_api_changes_push_liability_account_update_and_risk(sim: Simulator) -> None:
    with open_stream(sim) as ws:
        httpx.patch(f"{sim.url}/_sim/assets/a/BTC", json={"crossMarginBorrowed": "2"})
        (liability,) = events(ws, 1)
        assert liability["e"] == "liabilityChange"
        assert {k: liability[k] for k in ("a", "t", "p")} == {"a": "BTC", "t": "BORROW", "p": "2"}
        httpx.patch(f"{sim.url}/_sim/assets/a/USDT", json={"umWalletBalance": "7"})
        (update,) = events(ws, 1)
        assert update["e"] == "ACCOUNT_UPDATE"
        assert update["fs"] == "UM"
        assert update["a"]["m"] == "ORDER"
        assert update["a"]["B"][0]["a"] == "USDT"
        assert update["a"]["B"][0]["wb"] == "7"
        info = {**sim.account_info("a"), "accountStatus": "MARGIN_CALL", "uniMMR": "1.10000000"}
        httpx.put(f"{sim.url}/_sim/account/a", json=info)
        (risk,) = events(ws, 1)
        assert risk == {
            "e": "riskLevelChange",
            "E": risk["E"],
            "u": "1.10000000",
            "s": "MARGIN_CALL",
            "eq": info["accountEquity"],
            "ae": info["actualEquity"],
            "m": info["accountMaintMargin"],
        }
        sim.set_account_info("a", {**info, "accountStatus": "NORMAL"})  # no event for NORMAL
        sim.set_asset("a", "USDT", umUnrealizedPNL="-5", updateTime=1)  # nor for PnL alone
        sim.set_balances("a", {"not": "a list"})  # a shape the API never sends: still news
        (odd,) = events(ws, 1)
        assert odd["e"] == "outboundAccountPosition"
        assert odd["B"] == []


def test_demo_drift_and_its_negative_episode_push_events(sim: Simulator, clock: EventClock) -> None:
    with open_stream(sim, "a") as a, open_stream(sim, "b") as b:
        drift = Drift(sim, assets_per_account=3, rng=random.Random(1))  # publishes at once
        for ws in (a, b):
            assert ws.recv(timeout=5)
        clock.time += 20  # past the first negative episode's start (5 to 15 s)
        drift.tick()
        negative = {
            name: any(
                r["crossMarginFree"] == "0.00000000" and r["negativeBalance"] != "0"
                for r in sim.balances(name)
            )
            for name in KEYS
        }
        (name,) = [n for n, yes in negative.items() if yes]
        ws = a if name == "a" else b
        zero_rows = []
        deadline = time.monotonic() + 5
        while not zero_rows and time.monotonic() < deadline:
            event = json.loads(ws.recv(timeout=5))
            if event["e"] == "outboundAccountPosition":
                zero_rows = [row for row in event["B"] if Decimal(row["f"]) == 0]
        assert zero_rows


# ---------------------------------------------------------------- the connection


def test_the_server_pings_and_counts_pongs(sim: Simulator) -> None:
    with open_stream(sim):
        wait_until(lambda: sim.stream.pongs("a") >= 3, what="three pongs")


def test_an_unknown_key_cannot_connect(sim: Simulator) -> None:
    with pytest.raises(InvalidStatus) as caught:
        connect(f"{sim.stream_url}/not-a-key", proxy=None)
    assert caught.value.response.status_code == 400
    assert b"not-a-key" not in caught.value.response.body


def test_a_key_expiring_on_the_clock_sends_listen_key_expired(
    sim: Simulator, clock: EventClock
) -> None:
    with open_stream(sim) as ws:
        clock.time += 3600
        (expired,) = events(ws, 1)
        assert expired == {"e": "listenKeyExpired", "E": expired["E"]}  # as documented
        assert isinstance(expired["E"], int)
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=5)
    assert sim.listen_key("a") is None


@pytest.mark.slow
def test_the_connection_closes_at_24_hours(sim: Simulator, clock: EventClock) -> None:
    with open_stream(sim) as ws:
        for _ in range(24):
            clock.time += 3500
            listen_key(sim, "PUT")
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.2)
        clock.time += 86400 - 24 * 3500
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=5)


# ---------------------------------------------------------------- faults


def fault(sim: Simulator, **spec: Any) -> httpx.Response:
    return httpx.post(f"{sim.url}/_sim/stream/faults", json=spec)


def test_drop_cuts_the_connection_without_a_close_frame(sim: Simulator) -> None:
    with open_stream(sim) as ws:
        assert fault(sim, kind="drop", account="a").status_code == 200
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=5)
        assert caught.value.rcvd is None


def test_expire_key_fault(sim: Simulator) -> None:
    with open_stream(sim) as ws:
        key = sim.listen_key("a")
        fault(sim, kind="expire_key", account="a")
        (expired,) = events(ws, 1)
        assert expired == {"e": "listenKeyExpired", "E": expired["E"], "listenKey": key}
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=5)
    assert listen_key(sim, "PUT").json()["code"] == -1125


def test_refused_upgrades(sim: Simulator) -> None:
    key = listen_key(sim).json()["listenKey"]
    fault(sim, kind="refuse_upgrades", count=2, status=503)
    for _ in range(2):
        with pytest.raises(InvalidStatus) as caught:
            connect(f"{sim.stream_url}/{key}", proxy=None)
        assert caught.value.response.status_code == 503
    with connect(f"{sim.stream_url}/{key}", proxy=None):
        pass
    fault(sim, kind="refuse_upgrades")  # until cleared
    with pytest.raises(InvalidStatus):
        connect(f"{sim.stream_url}/{key}", proxy=None)
    httpx.delete(f"{sim.url}/_sim/faults")
    with connect(f"{sim.stream_url}/{key}", proxy=None):
        pass
    assert sim.stream.refused == 3


@pytest.mark.slow
def test_silent_sends_no_events_and_no_pings(sim: Simulator) -> None:
    with open_stream(sim) as ws:
        wait_until(lambda: sim.stream.pongs("a") >= 1, what="a pong")
        fault(sim, kind="silent", account="a")
        sim.set_asset("a", "USDT", crossMarginFree="1")
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.3)
        pongs = sim.stream.pongs("a")
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.3)  # six ping intervals without a ping
        assert sim.stream.pongs("a") == pongs
        sim.clear_faults()
        sim.set_asset("a", "USDT", crossMarginFree="2")
        assert json.loads(ws.recv(timeout=5))["e"] == "outboundAccountPosition"


def test_malformed_unknown_and_big_frames(sim: Simulator) -> None:
    with open_stream(sim) as ws:
        fault(sim, kind="malformed", account="a")
        with pytest.raises(ValueError, match=r"Expecting|Unterminated|delimiter"):
            json.loads(ws.recv(timeout=5))
        fault(sim, kind="malformed", body="\x00not json")
        assert ws.recv(timeout=5) == "\x00not json"
        fault(sim, kind="unknown_event")
        assert json.loads(ws.recv(timeout=5))["e"] == "SIMULATOR_UNKNOWN_EVENT"
        fault(sim, kind="big_frame", account="a")
        big = ws.recv(timeout=5)
        assert len(big) >= 1_000_000
        assert json.loads(big)["e"] == "SIMULATOR_UNKNOWN_EVENT"


def test_max_age_is_configurable(sim: Simulator, clock: EventClock) -> None:
    fault(sim, kind="max_age", seconds=60)
    with open_stream(sim) as ws:
        clock.time += 61
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=5)


@pytest.mark.parametrize(
    ("spec", "status", "message"),
    [
        ({"kind": "flood"}, 400, "unknown stream fault kind 'flood'"),
        ({"kind": "drop", "account": "zz"}, 404, "unknown account: zz"),
        ({"kind": "max_age"}, 400, "missing seconds"),
        ({"kind": "drop", "seconds": 1}, 400, "unknown parameter seconds"),
        ({"kind": "refuse_upgrades", "count": 0}, 400, "count and status are integers"),
        ({"account": "a"}, 400, 'a fault needs "kind"'),
    ],
)
def test_bad_stream_faults_are_refused(
    sim: Simulator, spec: dict[str, Any], status: int, message: str
) -> None:
    reply = fault(sim, **spec)
    assert reply.status_code == status
    assert message in reply.json()["error"]
