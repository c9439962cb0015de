"""The client's error mapping and header handling, against an httpx.MockTransport; the
server time (exporter.clocksync) against the simulator's documented time endpoints."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from support.faultkit import captured_logs
from support.mockclient import call_client

from exporter.binance import errors
from exporter.binance.client import (
    FAPI_TIME_PATH,
    MAX_RESPONSE_BYTES,
    SPOT_TIME_PATH,
    BinanceClient,
    Credentials,
    RequestReport,
    used_weight_1m,
)
from exporter.binance.signing import HmacSigner
from exporter.budget import BudgetLimits, WeightBudget
from exporter.clocksync import ClockSync, TimeSource
from exporter.selfmetrics import Instruments
from exporter.simulator import SimAccount, Simulator

SECRET = "s3cr3t-value-for-tests"
API_KEY = "api-key-for-tests"
CREDS = Credentials(SecretStr(API_KEY), HmacSigner(SecretStr(SECRET)))


def run_balance(
    handler: Callable[[httpx.Request], httpx.Response],
) -> tuple[object, list[RequestReport]]:
    return call_client(handler, lambda client: client.balance(CREDS))


def answer(status: int, body: object, **headers: str) -> Callable[[httpx.Request], httpx.Response]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda request: httpx.Response(status, content=content, headers=headers)


def test_signed_request_shape() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[], headers={"X-MBX-USED-WEIGHT-1M": "20"})

    result, reports = run_balance(handler)
    assert result is not None
    assert not isinstance(result, Exception)
    (request,) = seen
    assert request.url.path == "/papi/v1/balance"
    assert request.headers["X-MBX-APIKEY"] == API_KEY
    query = request.url.query.decode()
    assert query.startswith("recvWindow=5000&timestamp=")
    assert query.rsplit("&", 1)[1].startswith("signature=")
    assert reports == [RequestReport("balance", "success", reports[0].duration, 20)]


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "outcome"),
    [
        (
            429,
            {"code": -1003, "msg": "Too many requests"},
            {"Retry-After": "7"},
            errors.RateLimited,
            "rate_limited",
        ),
        (
            418,
            {
                "code": -1003,
                "msg": "Way too many requests; IP(1.2.3.4) banned until "
                "1700000000000. Please use the websocket",
            },
            {},
            errors.IpBanned,
            "banned",
        ),
        (
            400,
            {"code": -1021, "msg": "Timestamp for this request is outside of the recvWindow."},
            {},
            errors.TimestampError,
            "timestamp_error",
        ),
        (
            400,
            {"code": -1022, "msg": "Signature for this request is not valid."},
            {},
            errors.AuthError,
            "auth_error",
        ),
        (
            401,
            {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."},
            {},
            errors.AuthError,
            "auth_error",
        ),
        (
            401,
            {"code": -2014, "msg": "API-key format invalid."},
            {},
            errors.AuthError,
            "auth_error",
        ),
        (
            400,
            {"code": -1102, "msg": "Mandatory parameter was not sent"},
            {},
            errors.ApiError,
            "api_error",
        ),
        (500, b"<html>oops</html>", {}, errors.ServerError, "server_error"),
        (502, b"Bad Gateway", {}, errors.ServerError, "server_error"),
        (
            503,
            {"code": -1000, "msg": "An unknown error occurred"},
            {},
            errors.ServerError,
            "server_error",
        ),
        (503, b"Service Unavailable", {}, errors.ServerError, "server_error"),
        (403, b"<html>WAF</html>", {}, errors.WafBlocked, "waf_blocked"),
        (403, b"<html>WAF</html>", {"Retry-After": "30"}, errors.WafBlocked, "waf_blocked"),
        (200, b"{not json", {}, errors.InvalidResponse, "invalid_response"),
        (200, {"code": 0}, {}, errors.InvalidResponse, "invalid_response"),
        (200, 12, {}, errors.InvalidResponse, "invalid_response"),
    ],
)
def test_error_mapping(
    status: int, body: object, headers: dict[str, str], kind: type, outcome: str
) -> None:
    headers = {"x-mbx-used-weight-1m": "123", **headers}
    result, reports = run_balance(answer(status, body, **headers))
    assert type(result) is kind
    assert isinstance(result, errors.BinanceError)
    assert result.outcome == outcome
    assert result.used_weight == 123
    assert [(r.outcome, r.used_weight) for r in reports] == [(outcome, 123)]
    assert "signature" not in str(result)
    assert SECRET not in str(result)


def test_rate_limit_details() -> None:
    result, _ = run_balance(answer(429, {"code": -1003, "msg": "x"}, **{"Retry-After": "7"}))
    assert isinstance(result, errors.RateLimited)
    assert result.retry_after == 7
    result, _ = run_balance(answer(429, {"code": -1003, "msg": "x"}))
    assert isinstance(result, errors.RateLimited)
    assert result.retry_after is None
    msg = "Way too many requests; IP(1.2.3.4) banned until 1700000000000."
    result, _ = run_balance(answer(418, {"code": -1003, "msg": msg}))
    assert isinstance(result, errors.IpBanned)
    assert result.banned_until == 1700000000.0
    # other scripts' digits are no time (int() reads them: a ban that ended in 2009)
    msg = "banned until \u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669\u0660"
    result, _ = run_balance(answer(418, {"code": -1003, "msg": msg}))
    assert isinstance(result, errors.IpBanned)
    assert result.banned_until is None


def test_transport_failures() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    result, reports = run_balance(timeout)
    assert isinstance(result, errors.RequestTimeout)
    assert reports[0].outcome == "timeout"
    result, reports = run_balance(refused)
    assert isinstance(result, errors.ConnectionFailed)
    assert reports[0].outcome == "connection_error"


def test_used_weight_header_is_case_insensitive_and_1m_only() -> None:
    assert used_weight_1m(httpx.Headers({"X-MBX-USED-WEIGHT-1M": "5"})) == 5
    assert used_weight_1m(httpx.Headers({"x-mbx-used-weight-1m": "6"})) == 6
    assert used_weight_1m(httpx.Headers({"x-mbx-used-weight-1h": "6"})) is None
    assert used_weight_1m(httpx.Headers({"x-mbx-used-weight-1m": "lots"})) is None


def test_measure_offset_reads_another_host_and_reports_to_its_observer() -> None:
    now = [1000.0]
    seen: list[str] = []
    own: list[RequestReport] = []
    theirs: list[RequestReport] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        assert "X-MBX-APIKEY" not in request.headers
        return httpx.Response(200, json={"serverTime": 1003_000})

    async def go() -> float:
        client = BinanceClient(
            base_url="http://binance.test",
            timeout_seconds=1,
            recv_window_ms=5000,
            transport=httpx.MockTransport(handler),
            clock=lambda: now[0],
            observer=own.append,
        )
        offset = await client.measure_offset(
            "http://fapi.binance.test/fapi/v1/time", "fapi_time", observer=theirs.append
        )
        assert client.clock_offset == 0.0  # the caller sets it (exporter.clocksync)
        await client.aclose()
        return offset

    assert asyncio.run(go()) == 3.0
    assert seen == ["http://fapi.binance.test/fapi/v1/time"]
    assert own == []
    assert [(r.endpoint, r.outcome) for r in theirs] == [("fapi_time", "success")]


def test_a_body_past_the_cap_is_refused_without_reading_it_all() -> None:
    sent = [0]

    async def endless() -> AsyncIterator[bytes]:
        chunk = b"[" + b" " * (1024 * 1024 - 1)
        while sent[0] < 100:  # 100 MiB if nothing stopped reading
            sent[0] += 1
            yield chunk

    result, reports = run_balance(lambda request: httpx.Response(200, content=endless()))
    assert isinstance(result, errors.InvalidResponse)
    assert f"larger than {MAX_RESPONSE_BYTES} bytes" in str(result)
    assert sent[0] <= MAX_RESPONSE_BYTES // (1024 * 1024) + 1
    assert [r.outcome for r in reports] == ["invalid_response"]


@pytest.mark.slow
def test_a_balance_list_of_thousands_of_assets_fits() -> None:
    record = {
        "asset": "ASSET0000",
        "totalWalletBalance": "123456789.12345678",
        "crossMarginAsset": "123456789.12345678",
        "crossMarginBorrowed": "123456789.12345678",
        "crossMarginFree": "123456789.12345678",
        "crossMarginInterest": "123456789.12345678",
        "crossMarginLocked": "123456789.12345678",
        "umWalletBalance": "123456789.12345678",
        "umUnrealizedPNL": "123456789.12345678",
        "cmWalletBalance": "123456789.12345678",
        "cmUnrealizedPNL": "123456789.12345678",
        "updateTime": 1700000000000,
        "negativeBalance": "0.0",
    }
    body = [{**record, "asset": f"A{i:08d}"} for i in range(5000)]
    assert len(json.dumps(body)) < MAX_RESPONSE_BYTES // 4
    result, _ = run_balance(answer(200, body))
    assert not isinstance(result, errors.BinanceError), result


# ---------------------------------------------------------------- the server time


class TimeSetup:
    """A client of the simulator, and a ClockSync reading its documented time endpoints
    (the futures host's first, then the spot host's), each on a budget of its own."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.registry = CollectorRegistry()
        self.instruments = Instruments(self.registry)
        limits = BudgetLimits(2400, 1.0, 0.8)  # pacing never binds here
        self.fapi = WeightBudget("fapi:default", limits)
        self.spot = WeightBudget("spot:default", limits)
        self.sync = ClockSync(
            [
                TimeSource(sim.url + FAPI_TIME_PATH, "fapi_time", self.fapi),
                TimeSource(sim.url + SPOT_TIME_PATH, "spot_time", self.spot),
            ],
            self.instruments,
            egress="default",
        )

    def client(self) -> BinanceClient:
        return BinanceClient(base_url=self.sim.url, timeout_seconds=5, recv_window_ms=5000)

    def requests(self, endpoint: str, outcome: str) -> float:
        labels = {"endpoint": endpoint, "outcome": outcome}
        return self.registry.get_sample_value("binance_pm_requests_total", labels) or 0.0

    def paths(self) -> list[str]:
        return [r.path for r in self.sim.requests]


@pytest.fixture
def timed() -> Iterator[TimeSetup]:
    with Simulator([SimAccount.hmac("a", API_KEY, SECRET)], assets_per_account=2) as sim:
        yield TimeSetup(sim)


def test_the_time_comes_from_the_futures_host_on_its_own_pool(timed: TimeSetup) -> None:
    timed.sim.clock_offset_ms = 4000

    async def go() -> float | None:
        client = timed.client()
        try:
            offset = await timed.sync.sync(client)
            assert client.clock_offset == offset
            return offset
        finally:
            await client.aclose()

    assert asyncio.run(go()) == pytest.approx(4.0, abs=0.5)
    assert timed.paths() == ["/fapi/v1/time"]
    assert (timed.sim.fapi_weight_used(), timed.sim.weight_used()) == (1, 0)  # not the PM pool
    assert (timed.fapi.spent_total, timed.spot.spent_total) == (1, 0)
    assert timed.requests("fapi_time", "success") == 1


def test_the_spot_host_answers_when_the_futures_host_fails(timed: TimeSetup) -> None:
    timed.sim.clock_offset_ms = -2500
    timed.sim.inject_fault("rate_limit", endpoint=FAPI_TIME_PATH, retry_after=60)

    async def go() -> tuple[float | None, float | None]:
        client = timed.client()
        try:
            first = await timed.sync.sync(client)
            second = await timed.sync.sync(client)  # the futures pool is paused: skipped
            return first, second
        finally:
            await client.aclose()

    with captured_logs() as logs:
        first, second = asyncio.run(go())
    assert first == pytest.approx(-2.5, abs=0.5)
    assert second == pytest.approx(-2.5, abs=0.5)
    assert timed.paths() == ["/fapi/v1/time", "/api/v3/time", "/api/v3/time"]
    assert timed.fapi.is_paused(timed.fapi.now())  # the 429 paused the futures pool only
    assert not timed.spot.is_paused(timed.spot.now())
    assert timed.sim.weight_used() == 0
    assert [e["source"] for e in logs.events("time_synced")] == ["spot_time", "spot_time"]
    assert timed.requests("fapi_time", "rate_limited") == 1


def test_no_time_source_keeps_the_offset_and_says_so(timed: TimeSetup) -> None:
    for path in (FAPI_TIME_PATH, SPOT_TIME_PATH):
        timed.sim.inject_fault("status", endpoint=path, status=503)

    async def go() -> tuple[float | None, float]:
        client = timed.client()
        client.clock_offset = 1.25
        try:
            return await timed.sync.sync(client), client.clock_offset
        finally:
            await client.aclose()

    with captured_logs() as logs:
        assert asyncio.run(go()) == (None, 1.25)
    (failed,) = logs.events("time_sync_failed")
    assert "503" in failed["error"]


def test_syncs_asked_for_at_once_share_one_request(timed: TimeSetup) -> None:
    async def go() -> list[float | None]:
        client = timed.client()
        try:
            return list(await asyncio.gather(*(timed.sync.sync(client) for _ in range(5))))
        finally:
            await client.aclose()

    offsets = asyncio.run(go())
    assert len(set(offsets)) == 1
    assert timed.paths() == ["/fapi/v1/time"]


def test_a_1021_is_recovered_through_the_documented_time_endpoint(timed: TimeSetup) -> None:
    """The simulator answers 404 on /papi/v1/time, as Binance documents no such path: the
    -1021 recovery works because the time comes from /fapi/v1/time."""
    timed.sim.clock_offset_ms = -3000  # our timestamps 3 s ahead of the server: -1021

    async def go() -> object:
        client = timed.client()
        try:
            with pytest.raises(errors.TimestampError):
                await client.balance(CREDS)
            await timed.sync.sync(client)
            return await client.balance(CREDS)
        finally:
            await client.aclose()

    parsed = asyncio.run(go())
    assert len(parsed.balances) == 2  # type: ignore[attr-defined]
    assert timed.paths() == ["/papi/v1/balance", "/fapi/v1/time", "/papi/v1/balance"]
    assert httpx.get(timed.sim.url + "/papi/v1/time").status_code == 404
