"""The client's error mapping and header handling, against an httpx.MockTransport."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from pydantic import SecretStr

from exporter.binance import errors
from exporter.binance.client import (
    MAX_RESPONSE_BYTES,
    BinanceClient,
    Credentials,
    RequestReport,
    used_weight_1m,
)
from exporter.binance.signing import HmacSigner

SECRET = "s3cr3t-value-for-tests"
API_KEY = "api-key-for-tests"
CREDS = Credentials(SecretStr(API_KEY), HmacSigner(SecretStr(SECRET)))


def run_balance(
    handler: Callable[[httpx.Request], httpx.Response],
) -> tuple[object, list[RequestReport]]:
    reports: list[RequestReport] = []

    async def go() -> object:
        client = BinanceClient(
            base_url="http://binance.test",
            timeout_seconds=1,
            recv_window_ms=5000,
            observer=reports.append,
            transport=httpx.MockTransport(handler),
        )
        try:
            return await client.balance(CREDS)
        except errors.BinanceError as exc:
            return exc
        finally:
            await client.aclose()

    return asyncio.run(go()), reports


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
