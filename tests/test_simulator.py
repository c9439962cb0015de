"""The PM API simulator, over real loopback HTTP.

Requests are signed here with plain hmac/cryptography code, independent of both
the exporter's client and the simulator's checks.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import http.client
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from support.waits import wait_until

from exporter.simulator import FAULT_KINDS, SimAccount, Simulator
from exporter.simulator.cli import main as simulator_main
from exporter.simulator.demo import Drift, start_demo
from exporter.simulator.state import RequestLog, RequestRecord
from exporter.simulator.virtualtime import EventClock

ROOT = Path(__file__).resolve().parent.parent
BALANCE = "/papi/v1/balance"
ACCOUNT = "/papi/v1/account"
PING = "/papi/v1/ping"
Key = str | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


# ------------------------------------------------------------------ signing, test side


def signature(key: Key, payload: str) -> str:
    """Binance's signature for `payload`, as it goes into the query (percent-encoded)."""
    data = payload.encode()
    if isinstance(key, str):
        return hmac.new(key.encode(), data, hashlib.sha256).hexdigest()
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        raw = key.sign(data)
    return quote(base64.b64encode(raw).decode(), safe="")


def signed_query(key: Key, params: dict[str, Any] | None = None, *, ts: int | None = None) -> str:
    items = dict(params or {})
    items.setdefault("timestamp", ts if ts is not None else int(time.time() * 1000))
    query = urlencode(items)
    return f"{query}&signature={signature(key, query)}"


def public_pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {
        "alpha": "alpha-secret",
        "bravo": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "charlie": ed25519.Ed25519PrivateKey.generate(),
    }


def sim_accounts(keys: dict[str, Key]) -> list[SimAccount]:
    bravo, charlie = keys["bravo"], keys["charlie"]
    assert isinstance(bravo, rsa.RSAPrivateKey)
    assert isinstance(charlie, ed25519.Ed25519PrivateKey)
    return [
        SimAccount.hmac("alpha", "key-alpha", "alpha-secret"),
        SimAccount.rsa("bravo", "key-bravo", public_pem(bravo)),
        SimAccount.ed25519("charlie", "key-charlie", public_pem(charlie)),
    ]


@pytest.fixture
def sim(keys: dict[str, Key]) -> Iterator[Simulator]:
    with Simulator(sim_accounts(keys), assets_per_account=3) as simulator:
        yield simulator


@pytest.fixture
def client(sim: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=5) as c:
        yield c


class Caller:
    """Signed GETs as one account, timestamped by `clock` (the simulator's, when injected)."""

    def __init__(
        self, client: httpx.Client, keys: dict[str, Key], clock: Callable[[], float] = time.time
    ) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock

    def get(self, account: str, path: str = BALANCE, **params: Any) -> httpx.Response:
        query = signed_query(self.keys[account], params, ts=int(self.clock() * 1000))
        return self.client.get(f"{path}?{query}", headers={"X-MBX-APIKEY": f"key-{account}"})


@pytest.fixture
def call(client: httpx.Client, keys: dict[str, Key]) -> Caller:
    return Caller(client, keys)


@pytest.fixture
def frozen() -> EventClock:
    """A server clock that stands still 10 s into a minute: the per-minute weight counter
    cannot roll over in the middle of a test, however slow the machine."""
    return EventClock(1_699_999_990.0)


@pytest.fixture
def frozen_sim(keys: dict[str, Key], frozen: EventClock) -> Iterator[Simulator]:
    with Simulator(sim_accounts(keys), assets_per_account=3, clock=frozen) as simulator:
        yield simulator


@pytest.fixture
def frozen_call(
    frozen_sim: Simulator, keys: dict[str, Key], frozen: EventClock
) -> Iterator[Caller]:
    with httpx.Client(base_url=frozen_sim.url, timeout=5) as client:
        yield Caller(client, keys, frozen)


def error(response: httpx.Response) -> tuple[int, int]:
    return response.status_code, response.json()["code"]


# ------------------------------------------------------------------ endpoints and shapes


@pytest.mark.parametrize("path", ["/fapi/v1/time", "/api/v3/time"])
def test_ping_and_time(frozen_sim: Simulator, frozen: EventClock, path: str) -> None:
    """On the frozen server clock: the time is the server's to the millisecond, the
    offset is added, and a minute boundary cannot reset the weight counts meanwhile."""
    with httpx.Client(base_url=frozen_sim.url, timeout=5) as client:
        ping = client.get(PING)
        assert (ping.status_code, ping.json()) == (200, {})
        assert ping.headers["X-MBX-USED-WEIGHT-1M"] == "1"
        assert client.get(path).json()["serverTime"] == int(frozen.now() * 1000)
        frozen_sim.clock_offset_ms = 3000
        assert client.get(path).json()["serverTime"] == int(frozen.now() * 1000) + 3000
    # Each host counts weight in its own pool: the PM pool saw only the ping.
    assert frozen_sim.weight_used() == 1
    assert frozen_sim.fapi_weight_used() + frozen_sim.spot_weight_used() == 2


def test_only_documented_endpoints_are_served(client: httpx.Client) -> None:
    """/papi/v1/time is in no Binance doc and no SDK: 404, as a test must not pass on it."""
    for path in ("/papi/v1/time", "/papi/v2/time", "/fapi/v1/ping", "/api/v3/exchangeInfo"):
        response = client.get(path)
        assert error(response) == (404, -1020), path


@pytest.mark.parametrize("account", ["alpha", "bravo", "charlie"])
def test_every_key_type_is_accepted(call: Caller, account: str) -> None:
    response = call.get(account)
    assert response.status_code == 200, response.text
    records = response.json()
    assert [r["asset"] for r in records] == ["USDT", "BTC", "ETH"]
    for r in records:
        free, locked = float(r["crossMarginFree"]), float(r["crossMarginLocked"])
        assert float(r["crossMarginAsset"]) == pytest.approx(free + locked)
        total = free + locked + float(r["umWalletBalance"]) + float(r["cmWalletBalance"])
        assert float(r["totalWalletBalance"]) == pytest.approx(total)
        assert re.fullmatch(r"-?\d+\.\d{8}", r["totalWalletBalance"])
        assert isinstance(r["updateTime"], int)
    assert records[0]["cmUnrealizedPNL"] == ""  # USDT has no coin-margined book
    assert response.headers["X-MBX-USED-WEIGHT-1M"] == "20"


def test_single_asset_shape_lacks_cross_margin_asset(call: Caller) -> None:
    record = call.get("alpha", asset="BTC").json()
    assert isinstance(record, dict)
    assert record["asset"] == "BTC"
    assert "crossMarginAsset" not in record
    assert "totalWalletBalance" in record
    assert error(call.get("alpha", asset="NOPE")) == (400, -1102)


def test_account_info(call: Caller) -> None:
    info = call.get("charlie", ACCOUNT).json()
    for name in (
        "uniMMR",
        "accountEquity",
        "actualEquity",
        "accountInitialMargin",
        "accountMaintMargin",
        "virtualMaxWithdrawAmount",
        "totalAvailableBalance",
        "totalMarginOpenLoss",
    ):
        float(info[name])
        assert isinstance(info[name], str)
    assert info["accountStatus"] == "NORMAL"
    assert isinstance(info["updateTime"], int)


def test_unknown_path_and_method(client: httpx.Client) -> None:
    missing = client.get("/papi/v1/nope")
    assert missing.status_code == 404
    assert set(missing.json()) == {"code", "msg"}
    assert missing.headers["X-MBX-USED-WEIGHT-1M"] == "0"
    assert client.post(PING).status_code == 405


def test_many_assets_get_generated_names(keys: dict[str, Key]) -> None:
    sim = Simulator(sim_accounts(keys), assets_per_account=40)
    names = [r["asset"] for r in sim.balances("alpha")]
    assert len(set(names)) == 40
    assert names[:3] == ["USDT", "BTC", "ETH"]
    assert "ASSET39" in names


# ------------------------------------------------------------------ authentication


@pytest.mark.parametrize("account", ["alpha", "bravo", "charlie"])
def test_bad_signatures_are_refused(
    client: httpx.Client, keys: dict[str, Key], account: str
) -> None:
    headers = {"X-MBX-APIKEY": f"key-{account}"}
    query = f"timestamp={int(time.time() * 1000)}"
    good = signature(keys[account], query)
    other: Key = "other" if account == "alpha" else ed25519.Ed25519PrivateKey.generate()
    bad_queries = [
        f"{query}&signature={signature(other, query)}",  # another key
        f"{query}&signature={good[:-4]}AAAA",  # tampered
        f"{query}&asset=BTC&signature={good}",  # a parameter not signed
        f"signature={good}&{query}",  # signature not last
        f"{query}&signature=%%%",  # not even base64/hex
    ]
    for bad in bad_queries:
        response = client.get(f"{BALANCE}?{bad}", headers=headers)
        assert error(response) == (400, -1022), bad
    assert client.get(f"{BALANCE}?{query}&signature={good}", headers=headers).status_code == 200


def test_unencoded_base64_signature_is_refused(client: httpx.Client, keys: dict[str, Key]) -> None:
    """A '+' left unencoded arrives as a space: the signature no longer verifies."""
    key = keys["charlie"]
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    for ts in range(int(time.time() * 1000), int(time.time() * 1000) + 200):
        query = f"timestamp={ts}"
        raw = base64.b64encode(key.sign(query.encode())).decode()
        if "+" in raw:
            break
    else:
        pytest.fail("no signature with a '+' found")
    headers = {"X-MBX-APIKEY": "key-charlie"}
    assert error(client.get(f"{BALANCE}?{query}&signature={raw}", headers=headers)) == (400, -1022)
    encoded = quote(raw, safe="")
    assert client.get(f"{BALANCE}?{query}&signature={encoded}", headers=headers).status_code == 200


def test_api_key_errors(client: httpx.Client, keys: dict[str, Key]) -> None:
    query = signed_query(keys["alpha"])
    assert error(client.get(f"{BALANCE}?{query}")) == (401, -2014)
    unknown = client.get(f"{BALANCE}?{query}", headers={"X-MBX-APIKEY": "who"})
    assert error(unknown) == (401, -2015)
    assert unknown.json()["msg"] == "Invalid API-key, IP, or permissions for action."
    # A valid signature made with another account's secret does not pass either.
    crossed = client.get(f"{BALANCE}?{query}", headers={"X-MBX-APIKEY": "key-bravo"})
    assert error(crossed) == (400, -1022)


def test_mandatory_and_malformed_parameters(client: httpx.Client, keys: dict[str, Key]) -> None:
    headers = {"X-MBX-APIKEY": "key-alpha"}

    def get(query: str) -> httpx.Response:
        return client.get(
            f"{BALANCE}?{query}&signature={signature(keys['alpha'], query)}", headers=headers
        )

    assert error(get("recvWindow=5000")) == (400, -1102)  # no timestamp
    assert error(get("timestamp=12x")) == (400, -1100)
    now = int(time.time() * 1000)
    assert error(get(f"timestamp={now}&timestamp={now}")) == (400, -1101)
    assert error(get(f"timestamp={now}&recvWindow=60001")) == (400, -1131)
    assert get(f"timestamp={now}&recvWindow=60000").status_code == 200
    no_signature = client.get(f"{BALANCE}?timestamp={now}", headers=headers)
    assert error(no_signature) == (400, -1102)


def test_timestamp_window(frozen_sim: Simulator, frozen_call: Caller, frozen: EventClock) -> None:
    sim, call = frozen_sim, frozen_call
    now = int(frozen() * 1000)

    def at(ts: int, **params: Any) -> httpx.Response:
        query = signed_query("alpha-secret", params, ts=ts)
        return call.client.get(f"{BALANCE}?{query}", headers={"X-MBX-APIKEY": "key-alpha"})

    assert error(at(now - 6000)) == (400, -1021)  # older than the default 5000 ms
    assert at(now - 6000, recvWindow=10000).status_code == 200
    assert at(now + 500).status_code == 200
    ahead = at(now + 1500)
    assert error(ahead) == (400, -1021)
    assert "ahead of the server" in ahead.json()["msg"]

    sim.clock_offset_ms = 3000  # server 3 s ahead: a fresh timestamp is 3 s old, still fine
    assert call.get("alpha").status_code == 200
    sim.clock_offset_ms = 6000  # 6 s ahead: too old for the default recvWindow
    assert error(call.get("alpha")) == (400, -1021)
    sim.clock_offset_ms = -3000  # server 3 s behind: the request looks 3 s early
    assert error(call.get("alpha")) == (400, -1021)


def test_simulator_verifies_with_its_own_code() -> None:
    """No module of the simulator imports the exporter's Binance client or signing code."""
    for path in (ROOT / "exporter" / "simulator").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("exporter.binance"), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("exporter.binance") for a in node.names), path


def test_account_repr_hides_secrets(keys: dict[str, Key]) -> None:
    text = repr(sim_accounts(keys))
    assert "alpha-secret" not in text
    assert "key-alpha" not in text


# ------------------------------------------------------------------ data


def test_set_balances_serves_raw_shapes(sim: Simulator, call: Caller) -> None:
    bad: list[Any] = [
        {"asset": "USDT", "totalWalletBalance": 12.5, "crossMarginFree": None},
        {"asset": "BTC", "umWalletBalance": "NaN", "cmWalletBalance": "1e400"},
        "not an object",
        {"asset": "HUGE", "totalWalletBalance": 10**30},
    ]
    sim.set_balances("alpha", bad)
    assert call.get("alpha").json() == bad
    sim.set_balances("alpha", {"asset": "USDT"})  # an object where an array belongs
    assert call.get("alpha").json() == {"asset": "USDT"}
    sim.set_account_info("bravo", {"uniMMR": None, "accountStatus": "MARGIN_CALL"})
    assert call.get("bravo", ACCOUNT).json() == {"uniMMR": None, "accountStatus": "MARGIN_CALL"}


def test_set_and_remove_asset(sim: Simulator, call: Caller) -> None:
    sim.set_asset("alpha", "BTC", negativeBalance="12.50000000", cmUnrealizedPNL="")
    btc = next(r for r in call.get("alpha").json() if r["asset"] == "BTC")
    assert (btc["negativeBalance"], btc["cmUnrealizedPNL"]) == ("12.50000000", "")
    sim.set_asset("alpha", "PEPE", crossMarginFree="5.00000000")
    pepe = call.get("alpha", asset="PEPE").json()
    assert pepe["crossMarginFree"] == "5.00000000"
    assert pepe["totalWalletBalance"] == "0.00000000"  # new assets start at zero
    sim.remove_asset("alpha", "BTC")
    assert [r["asset"] for r in call.get("alpha").json()] == ["USDT", "ETH", "PEPE"]
    with pytest.raises(LookupError):
        sim.set_asset("nobody", "BTC")


# ------------------------------------------------------------------ weight


def test_weight_is_counted_per_ip_across_accounts(
    frozen_sim: Simulator, frozen_call: Caller, keys: dict[str, Key]
) -> None:
    sim, call = frozen_sim, frozen_call
    call.get("alpha")
    call.get("bravo", ACCOUNT)
    assert call.get("charlie").headers["X-MBX-USED-WEIGHT-1M"] == "60"
    assert call.client.get(PING).headers["X-MBX-USED-WEIGHT"] == "61"
    sim.add_foreign_weight("127.0.0.1", 1000)  # a trading bot on the same IP
    assert call.client.get(PING).headers["X-MBX-USED-WEIGHT-1M"] == "1062"
    assert sim.weight_used() == 1062

    second_ip = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=sim.url, transport=second_ip) as other:
        response = Caller(other, keys, call.clock).get("alpha")
        assert response.headers["X-MBX-USED-WEIGHT-1M"] == "20"
    assert sim.weight_used("127.0.0.2") == 20
    assert sim.weight_used("127.0.0.1") == 1062
    assert [r.client_ip for r in sim.requests][-1] == "127.0.0.2"
    assert [(r.account, r.weight) for r in sim.requests[:3]] == [
        ("alpha", 20),
        ("bravo", 20),
        ("charlie", 20),
    ]


def test_weight_resets_each_calendar_minute(keys: dict[str, Key]) -> None:
    clock = EventClock(1_699_999_990.0)  # 10 s into a minute
    with (
        Simulator(sim_accounts(keys), clock=clock, ip_weight_limit=30) as sim,
        httpx.Client(base_url=sim.url) as client,
    ):
        assert client.get(PING).headers["X-MBX-USED-WEIGHT-1M"] == "1"
        sim.add_foreign_weight("127.0.0.1", 29)
        refused = client.get(PING)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "50"
        assert refused.headers["X-MBX-USED-WEIGHT-1M"] == "30"
        clock.time = 1_700_000_041.0  # next minute
        assert client.get(PING).headers["X-MBX-USED-WEIGHT-1M"] == "1"


def test_429_then_418_ban(frozen: EventClock, keys: dict[str, Key]) -> None:
    with (
        Simulator(sim_accounts(keys), ip_weight_limit=50, clock=frozen) as limited,
        httpx.Client(base_url=limited.url) as client,
    ):
        call = Caller(client, keys, frozen)
        assert call.get("alpha").status_code == 200
        assert call.get("bravo").status_code == 200
        for _ in range(3):
            refused = call.get("charlie")
            assert error(refused) == (429, -1003)
            assert refused.headers["Retry-After"] == "50"  # the minute's end
            assert refused.headers["X-MBX-USED-WEIGHT-1M"] == "40"
        banned = call.get("alpha")
        assert error(banned) == (418, -1003)
        match = re.fullmatch(
            r"Way too many requests; IP\(127\.0\.0\.1\) banned until (\d+)\. "
            r"Please use the websocket for live updates to avoid bans\.",
            banned.json()["msg"],
        )
        assert match
        assert int(match[1]) == 1_699_999_990_000 + 120_000  # 2 minutes, the first ban
        assert banned.headers["Retry-After"] == "120"
        assert error(client.get(PING)) == (418, -1003)  # everything from that IP
        assert limited.weight_used() == 40  # refused requests add no weight
        assert [r.status for r in limited.requests] == [200, 200, 429, 429, 429, 418, 418]
        assert [r.weight for r in limited.requests] == [20, 20, 0, 0, 0, 0, 0]
        with httpx.Client(
            base_url=limited.url, transport=httpx.HTTPTransport(local_address="127.0.0.2")
        ) as other:
            assert other.get(PING).status_code == 200


# ------------------------------------------------------------------ faults


def test_fault_kinds_are_all_tested() -> None:
    assert set(FAULT_KINDS) == {
        "latency", "status", "malformed_json", "reset", "stall",
        "rate_limit", "ban", "api_error", "raw",
    }  # fmt: skip


def test_fault_latency(sim: Simulator, call: Caller) -> None:
    sim.inject_fault("latency", seconds=0.3, count=1)
    sim.inject_fault("status", status=503, count=1)  # matched only once the latency is used up
    start = time.monotonic()
    assert call.get("alpha").status_code == 200
    assert time.monotonic() - start >= 0.3  # a lower bound: load only makes it longer
    assert call.get("alpha").status_code == 503  # count=1: the second request is not delayed
    assert call.get("alpha").status_code == 200


def test_fault_status(sim: Simulator, call: Caller) -> None:
    for status in (500, 502, 503):
        sim.inject_fault("status", status=status, count=1)
    sim.inject_fault("status", status=503, body="Service Unavailable", count=1)
    r500, r502, r503, plain = (call.get("alpha") for _ in range(4))
    assert error(r500) == (500, -1000)
    assert r502.status_code == 502
    assert r502.headers["Content-Type"].startswith("text/html")
    assert r503.json() == {
        "code": -1000,
        "msg": "An unknown error occurred while processing the request.",
    }
    assert plain.status_code == 503
    assert plain.text == "Service Unavailable"
    assert plain.headers["Content-Type"].startswith("text/plain")
    assert plain.headers["X-MBX-USED-WEIGHT-1M"] == "80"  # faulted requests still cost weight
    assert call.get("alpha").status_code == 200


def test_fault_malformed_json(sim: Simulator, call: Caller) -> None:
    sim.inject_fault("malformed_json", endpoint=BALANCE, count=1)
    response = call.get("alpha")
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_fault_reset(sim: Simulator, call: Caller) -> None:
    sim.inject_fault("reset", count=1)
    with pytest.raises(httpx.ReadError):
        call.get("alpha")
    assert call.get("alpha").status_code == 200  # the pool reconnects
    assert [r.status for r in sim.requests] == [0, 200]


def test_fault_stall(sim: Simulator, keys: dict[str, Key]) -> None:
    sim.inject_fault("stall", seconds=30, count=1)
    query = signed_query(keys["alpha"])
    timeout = httpx.Timeout(5, read=0.3)
    headers = {"X-MBX-APIKEY": "key-alpha"}
    with (
        httpx.Client(base_url=sim.url, timeout=timeout) as client,
        client.stream("GET", f"{BALANCE}?{query}", headers=headers) as response,
    ):
        assert response.status_code == 200  # the headers came
        with pytest.raises(httpx.ReadTimeout):
            response.read()
    # stop() below does not wait the 30 s out: the stall ends with the simulator


def test_fault_rate_limit_and_ban(sim: Simulator, call: Caller) -> None:
    sim.inject_fault("rate_limit", count=1)
    sim.inject_fault("rate_limit", retry_after=7, count=1)
    sim.inject_fault("ban", until_ms=1_700_000_000_000, retry_after=90, count=1)
    bare, with_retry, banned = (call.get("alpha") for _ in range(3))
    assert error(bare) == (429, -1003)
    assert "Retry-After" not in bare.headers
    assert with_retry.headers["Retry-After"] == "7"
    assert error(banned) == (418, -1003)
    assert "banned until 1700000000000." in banned.json()["msg"]
    assert banned.headers["Retry-After"] == "90"
    assert sim.weight_used() == 0  # these are refusals: no weight


def test_fault_api_error_and_raw(sim: Simulator, call: Caller) -> None:
    sim.inject_fault("api_error", status=401, code=-2015, msg="nope", count=1)
    sim.inject_fault(
        "raw",
        status=200,
        body='{"asset": "USDT"}',
        headers={"x-mbx-used-weight-1m": "5999", "X-Extra": "yes"},
        count=1,
    )
    assert call.get("alpha").json() == {"code": -2015, "msg": "nope"}
    raw = call.get("alpha")
    assert raw.json() == {"asset": "USDT"}
    assert raw.headers.get_list("X-MBX-USED-WEIGHT-1M") == ["5999"]
    assert raw.headers["X-Extra"] == "yes"


def test_faults_match_endpoint_and_account_and_count_down(sim: Simulator, call: Caller) -> None:
    sim.inject_fault("status", status=500, endpoint=BALANCE, account="bravo", count=2)
    assert call.get("alpha").status_code == 200
    assert call.get("bravo", ACCOUNT).status_code == 200
    assert call.get("bravo").status_code == 500
    assert call.get("bravo").status_code == 500
    assert call.get("bravo").status_code == 200  # count used up

    sim.inject_fault("status", status=502, account="charlie")  # until cleared
    assert all(call.get("charlie").status_code == 502 for _ in range(3))
    sim.clear_faults()
    assert call.get("charlie").status_code == 200


def test_bad_faults_are_refused(sim: Simulator) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        sim.inject_fault("gremlins")
    with pytest.raises(ValueError, match="missing seconds"):
        sim.inject_fault("latency")
    with pytest.raises(ValueError, match="unknown parameter"):
        sim.inject_fault("reset", seconds=1)
    with pytest.raises(ValueError, match="count"):
        sim.inject_fault("reset", count=0)
    with pytest.raises(LookupError):
        sim.inject_fault("reset", account="nobody")


# ------------------------------------------------------------------ admin over HTTP


def test_admin_endpoints(sim: Simulator, call: Caller, client: httpx.Client) -> None:
    assert client.put("/_sim/balances/alpha", json=[{"asset": "X"}]).json() == {"ok": True}
    assert call.get("alpha").json() == [{"asset": "X"}]
    client.patch("/_sim/assets/alpha/X", json={"crossMarginFree": "1.00000000"})
    client.patch("/_sim/assets/alpha/Y", json={"crossMarginFree": "2.00000000"})
    client.delete("/_sim/assets/alpha/X")
    assert [r["asset"] for r in call.get("alpha").json()] == ["Y"]
    client.put("/_sim/account/alpha", json={"accountStatus": "REDUCE_ONLY"})
    assert call.get("alpha", ACCOUNT).json() == {"accountStatus": "REDUCE_ONLY"}

    client.post("/_sim/faults", json={"kind": "status", "status": 503, "account": "alpha"})
    assert call.get("alpha").status_code == 503
    client.delete("/_sim/faults")
    assert call.get("alpha").status_code == 200

    client.put("/_sim/clock", json={"offset_ms": 6000})
    assert sim.clock_offset_ms == 6000
    assert error(call.get("alpha")) == (400, -1021)
    client.put("/_sim/clock", json={"offset_ms": 0})

    client.post("/_sim/foreign-weight", json={"ip": "127.0.0.9", "weight": 77})
    assert client.get("/_sim/weight", params={"ip": "127.0.0.9"}).json() == {
        "ip": "127.0.0.9",
        "weight": 77,
    }
    log = client.get("/_sim/requests").json()
    assert [(r["path"], r["account"], r["status"]) for r in log][-3:] == [
        (BALANCE, "alpha", 503),
        (BALANCE, "alpha", 200),
        (BALANCE, "alpha", 400),
    ]
    assert all(not r["path"].startswith("/_sim") for r in log)
    assert set(log[0]) == {"time", "client_ip", "method", "path", "account", "status", "weight"}
    # Admin calls cost no weight. (The log, not the per-minute counter: the minute may
    # roll over during the test, and the clock offset above moves the server's minute.)
    assert sum(r["weight"] for r in log) == 20 * 6
    assert client.get("/_sim/weight").json()["weight"] == sim.weight_used()


def test_admin_errors(client: httpx.Client) -> None:
    assert client.put("/_sim/balances/nobody", json=[]).status_code == 404
    assert client.put("/_sim/balances/alpha", content=b"{not json").status_code == 400
    assert client.post("/_sim/faults", json={"kind": "gremlins"}).status_code == 400
    assert client.post("/_sim/faults", json={"status": 500}).status_code == 400
    assert client.put("/_sim/clock", json={"offset_ms": "soon"}).status_code == 400
    assert client.get("/_sim/faults").status_code == 405
    assert client.get("/_sim/nothing").status_code == 404
    assert "error" in client.get("/_sim/nothing").json()


# ------------------------------------------------------------------ the server itself


def test_keep_alive_and_clean_stop(keys: dict[str, Key]) -> None:
    before = set(threading.enumerate())
    sim = Simulator(sim_accounts(keys), host="127.0.0.3").start()
    assert sim.url.startswith("http://127.0.0.3:")
    connection = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    for _ in range(3):  # one connection, three requests
        connection.request("GET", PING)
        assert connection.getresponse().read() == b"{}"
    sim.inject_fault("stall", seconds=60)
    stalled = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    stalled.request("GET", PING)
    stalled.getresponse()
    sim.stop()  # closes the idle keep-alive connection and ends the stall
    # stop() joins each thread for at most 5 s: a stall still sleeping its 60 s stays alive
    assert set(threading.enumerate()) <= before
    connection.close()
    stalled.close()
    sim.stop()  # idempotent


def test_request_log_is_capped() -> None:
    log = RequestLog(size=3)
    for i in range(5):
        log.append(RequestRecord(float(i), "127.0.0.1", "GET", PING, None, 200, 1))
    assert [r.time for r in log.snapshot()] == [2.0, 3.0, 4.0]


# ------------------------------------------------------------------ demo and command line


def private_key_of(entry: dict[str, str]) -> Key:
    if "api_secret" in entry:
        return entry["api_secret"]
    key = serialization.load_pem_private_key(entry["private_key"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey)
    return key


def test_demo_serves_three_key_types_and_drifts() -> None:
    sim, config = start_demo(3, tick_seconds=0.05)
    try:
        assert config["binance"] == {"base_url": sim.url, "stream_url": sim.stream_url}
        assert config["budget"]["min_interval_seconds"] > 0
        entries = config["accounts"]
        assert [e["name"] for e in entries] == ["desk-a", "desk-b", "desk-c"]
        assert ["api_secret" in e for e in entries] == [True, False, False]
        kinds = {type(private_key_of(e)).__name__ for e in entries}
        assert any("RSA" in k for k in kinds)
        assert any("Ed25519" in k for k in kinds)
        with httpx.Client(base_url=sim.url) as client:

            def balances(entry: dict[str, str]) -> Any:
                query = signed_query(private_key_of(entry))
                response = client.get(
                    f"{BALANCE}?{query}", headers={"X-MBX-APIKEY": entry["api_key"]}
                )
                assert response.status_code == 200, response.text
                return response.json()

            first = {e["name"]: balances(e) for e in entries}
            wait_until(lambda: balances(entries[0]) != first["desk-a"], 5, "the balances to drift")
    finally:
        sim.stop()
    assert not any(t.name == "sim-drift" and t.is_alive() for t in threading.enumerate())


def test_demo_config_parses_with_the_exporters_config() -> None:
    config_module = pytest.importorskip("exporter.config")
    sim, data = start_demo(3)
    try:
        config = config_module.parse_config(data, environ={}, base_dir=Path("."))
        assert [a.name for a in config.accounts] == ["desk-a", "desk-b", "desk-c"]
    finally:
        sim.stop()


def test_drift_has_negative_episodes(keys: dict[str, Key]) -> None:
    clock = EventClock(1_700_000_000.0)
    sim = Simulator(sim_accounts(keys), clock=clock)  # not started: data only
    drift = Drift(sim, assets_per_account=4, rng=random.Random(7))

    def negatives() -> list[str]:
        return [
            name
            for name in sim.account_names
            for r in sim.balances(name)
            if r["negativeBalance"] != "0"
        ]

    assert negatives() == []
    seen: list[list[str]] = []
    for _ in range(400):  # 400 s in 1 s ticks
        clock.time += 1
        drift.tick()
        seen.append(negatives())
    assert any(len(s) == 1 for s in seen)  # one account at a time
    assert all(len(s) <= 1 for s in seen)
    assert seen[-1] == [] or any(s == [] for s in seen[-100:])  # and it ends
    for name in sim.account_names:
        for r in sim.balances(name):
            assert float(r["crossMarginAsset"]) == pytest.approx(
                float(r["crossMarginFree"]) + float(r["crossMarginLocked"])
            )


@pytest.mark.parametrize(("move_chance", "moving"), [(0.0, False), (1.0, True)])
def test_drift_moves_free_balances_with_its_chance(
    keys: dict[str, Key], move_chance: float, moving: bool
) -> None:
    """Unrealized PnL moves every tick (no event on Binance); free balances, which push
    events, move with the drift's chance: the demo's default keeps its streams quiet."""
    clock = EventClock(1_700_000_000.0)
    sim = Simulator(sim_accounts(keys), clock=clock)  # not started: data only
    drift = Drift(sim, assets_per_account=4, rng=random.Random(3), move_chance=move_chance)

    def fields(name: str) -> list[str]:
        return [sim.balances(a)[0][name] for a in sim.account_names]

    free, pnl = fields("crossMarginFree"), fields("umUnrealizedPNL")
    clock.time += 1
    drift.tick()
    assert (fields("crossMarginFree") != free) is moving
    assert fields("umUnrealizedPNL") != pnl


def test_command_line_refuses_a_drift_chance_outside_0_to_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        simulator_main(["--drift", "2"])
    assert exit_info.value.code == 2
    assert "expected a chance from 0 to 1, got '2'" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_writes_config_and_stops_on_sigterm(tmp_path: Path) -> None:
    config_path = tmp_path / "config.yaml"
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter.simulator", "--accounts", "2", "--assets", "2",
         "--drift", "--write-config", str(config_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        url = match[1]
        line = process.stdout.readline()
        assert re.fullmatch(r"simulator stream on ws://127\.0\.0\.1:\d+/pm/ws\n", line), line
        config = yaml.safe_load(config_path.read_text())
        assert config_path.stat().st_mode & 0o077 == 0
        assert config["binance"]["base_url"] == url
        assert [a["name"] for a in config["accounts"]] == ["sim-00", "sim-01"]
        entry = config["accounts"][1]
        query = signed_query(entry["api_secret"])
        response = httpx.get(f"{url}{BALANCE}?{query}", headers={"X-MBX-APIKEY": entry["api_key"]})
        assert response.status_code == 200
        assert len(response.json()) == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_command_line_rejects_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter.simulator", "--listen", "nowhere"],
        cwd=ROOT, capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "expected HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr
