"""The simulated PM API: one request in, one `Reply` out, without touching sockets.

Order of work per request, as a gateway in front of Binance would do it:
1. look up the API key (so faults aimed at one account can match);
2. a matching `rate_limit`/`ban` fault answers at once, charging no weight;
3. the IP's weight is admitted or refused (429, then 418), refused requests charge nothing;
4. any other matching fault answers (latency only delays, then carries on);
5. routing (404, 405), then the API key, timestamp and signature checks;
6. the endpoint's data.
Every reply carries the IP's used weight, and every request is logged. The spot API's
ticker and time (`/api/v3/...`) and the USD-M futures API's time (`/fapi/v1/time`) are
served too, each host's weight counted in a pool of its own.

Only what Binance documents is served (plus the controls under /_sim/): the PM API has
no time endpoint (`/papi/v1/time` is in no doc and no SDK), so it answers 404 here, and
a test cannot pass on an endpoint that does not exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from exporter.simulator.auth import ApiError, SimAccount, check_signed_query, require_account
from exporter.simulator.state import SYMBOL_STATUSES, Admission, Fault, RequestRecord, SimState

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"

UNKNOWN_ERROR = {"code": -1000, "msg": "An unknown error occurred while processing the request."}
BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n"
    "<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)
MALFORMED_JSON = '[{"asset":"USDT","totalWalletBalance":"122607.35137903","crossMarginAsset":'


@dataclass
class ApiRequest:
    method: str
    path: str
    query: str  # raw, exactly as sent: signatures are checked over it
    api_key: str | None
    client_ip: str


@dataclass
class Reply:
    """What to send back. The server honours `stall_seconds` and `reset_after`."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    stall_seconds: float | None = None  # send the headers, wait this long, close
    reset_after: int | None = None  # send the headers and this many body bytes, then reset


@dataclass(frozen=True)
class Endpoint:
    weight: int
    #: "none", "api_key" (the X-MBX-APIKEY header only, as the listenKey calls) or "signed"
    auth: str
    serve: Callable[[SimState, SimAccount | None, dict[str, str]], Any]


def _ping(state: SimState, account: SimAccount | None, params: dict[str, str]) -> Any:
    return {}


def _time(state: SimState, account: SimAccount | None, params: dict[str, str]) -> Any:
    return {"serverTime": state.now_ms()}


def _balance(state: SimState, account: SimAccount | None, params: dict[str, str]) -> Any:
    assert account is not None
    records = state.book.balances(account.name)
    asset = params.get("asset")
    if asset is None:
        return records
    for record in records if isinstance(records, list) else []:
        if isinstance(record, dict) and record.get("asset") == asset:
            record.pop("crossMarginAsset", None)  # the single-asset shape lacks it
            return record
    raise ApiError(
        400, -1102, "Mandatory parameter 'asset' was not sent, was empty/null, or malformed."
    )


def _ticker_price(state: SimState, account: SimAccount | None, params: dict[str, str]) -> Any:
    status = params.get("symbolStatus")
    if status is not None and status not in SYMBOL_STATUSES:
        raise ApiError(400, -1100, "Illegal characters found in parameter 'symbolStatus'.")
    return state.prices.ticker(status)


def _account(state: SimState, account: SimAccount | None, params: dict[str, str]) -> Any:
    assert account is not None
    return state.book.account_info(account.name)


def _futures_account(book: str) -> Callable[[SimState, SimAccount | None, dict[str, str]], Any]:
    def serve(state: SimState, account: SimAccount | None, params: dict[str, str]) -> Any:
        assert account is not None
        return state.book.futures_account(account.name, book)

    return serve


def _open_listen_key(state: SimState, account: SimAccount | None, params: dict[str, str]) -> Any:
    assert account is not None
    return {"listenKey": state.listen_keys.open(account.name, state.now_ms())}


def _keep_listen_key(state: SimState, account: SimAccount | None, params: dict[str, str]) -> Any:
    assert account is not None
    if not state.listen_keys.extend(account.name, state.now_ms(), params.get("listenKey")):
        raise ApiError(400, -1125, "This listenKey does not exist.")
    return {}


def _close_listen_key(state: SimState, account: SimAccount | None, params: dict[str, str]) -> Any:
    assert account is not None
    if not state.listen_keys.close(account.name, state.now_ms(), params.get("listenKey")):
        raise ApiError(400, -1125, "This listenKey does not exist.")
    return {}


LISTEN_KEY_PATH = "/papi/v1/listenKey"

#: (method, path) -> endpoint
ENDPOINTS: dict[tuple[str, str], Endpoint] = {
    ("GET", "/papi/v1/ping"): Endpoint(weight=1, auth="none", serve=_ping),
    ("GET", "/papi/v1/balance"): Endpoint(weight=20, auth="signed", serve=_balance),
    ("GET", "/papi/v1/account"): Endpoint(weight=20, auth="signed", serve=_account),
    ("GET", "/papi/v1/um/account"): Endpoint(weight=5, auth="signed", serve=_futures_account("um")),
    ("GET", "/papi/v1/cm/account"): Endpoint(weight=5, auth="signed", serve=_futures_account("cm")),
    ("POST", LISTEN_KEY_PATH): Endpoint(weight=1, auth="api_key", serve=_open_listen_key),
    ("PUT", LISTEN_KEY_PATH): Endpoint(weight=1, auth="api_key", serve=_keep_listen_key),
    ("DELETE", LISTEN_KEY_PATH): Endpoint(weight=1, auth="api_key", serve=_close_listen_key),
    # the spot API (api.binance.com), served here too: its weight is counted apart
    ("GET", "/api/v3/ticker/price"): Endpoint(weight=4, auth="none", serve=_ticker_price),
    ("GET", "/api/v3/time"): Endpoint(weight=1, auth="none", serve=_time),
    # the USD-M futures API (fapi.binance.com): its server time, in a pool of its own too
    ("GET", "/fapi/v1/time"): Endpoint(weight=1, auth="none", serve=_time),
}


def handle(state: SimState, request: ApiRequest, sleep: Callable[[float], object]) -> Reply:
    """Answer one API request; `sleep` waits (and returns early when the server stops)."""
    arrived = state.clock()
    account = state.book.by_key(request.api_key)
    endpoint = ENDPOINTS.get((request.method, request.path))
    weight = endpoint.weight if endpoint else 0
    fault = state.faults.take(request.path, account.name if account else None)
    weights = state.weights_of(request.path)
    charged = 0
    if fault is not None and fault.kind in ("rate_limit", "ban"):
        reply = fault_reply(fault, request.client_ip)
    else:
        admission = weights.admit(request.client_ip, weight, state.now_ms())
        if admission.status == 200:
            charged = weight
            reply = _admitted(
                state, request, endpoint=endpoint, account=account, fault=fault, sleep=sleep
            )
        else:
            reply = _refused(admission, request.client_ip, weights.limit)

    used = str(weights.used(request.client_ip, state.now_ms()))
    present = {name.lower() for name in reply.headers}
    for name in ("X-MBX-USED-WEIGHT-1M", "X-MBX-USED-WEIGHT"):
        if name.lower() not in present:  # a `raw` fault may bring its own
            reply.headers[name] = used
    state.log.append(
        RequestRecord(
            time=arrived,
            client_ip=request.client_ip,
            method=request.method,
            path=request.path,
            account=account.name if account else None,
            status=0 if reply.reset_after is not None else reply.status,
            weight=charged,
        )
    )
    return reply


def _admitted(
    state: SimState,
    request: ApiRequest,
    *,
    endpoint: Endpoint | None,
    account: SimAccount | None,
    fault: Fault | None,
    sleep: Callable[[float], object],
) -> Reply:
    if fault is not None:
        if fault.kind != "latency":
            return fault_reply(fault, request.client_ip)
        sleep(float(fault.params["seconds"]))
    try:
        return json_reply(200, _serve(state, request, endpoint, account))
    except ApiError as error:
        return error_reply(error)


def _serve(
    state: SimState, request: ApiRequest, endpoint: Endpoint | None, account: SimAccount | None
) -> Any:
    if all(path != request.path for _, path in ENDPOINTS):
        raise ApiError(404, -1020, "This operation is not supported.")
    if endpoint is None:
        raise ApiError(405, -1020, "This operation is not supported.")
    if endpoint.auth == "signed":
        account = require_account(request.api_key, account)
        params = check_signed_query(account, request.query, state.now_ms())
    else:
        if endpoint.auth == "api_key":
            account = require_account(request.api_key, account)
        params = dict(parse_qsl(request.query, keep_blank_values=True))
    return endpoint.serve(state, account, params)


def _refused(admission: Admission, ip: str, limit: int) -> Reply:
    if admission.status == 418:
        assert admission.banned_until_ms is not None
        reply = ban_reply(ip, admission.banned_until_ms)
    else:
        reply = error_reply(
            ApiError(
                429,
                -1003,
                f"Too many requests; current limit of IP({ip}) is {limit} requests per minute. "
                "Please use the websocket for live updates to avoid polling the API.",
            )
        )
    reply.headers["Retry-After"] = str(admission.retry_after)
    return reply


def ban_reply(ip: str, until_ms: int) -> Reply:
    return error_reply(
        ApiError(
            418,
            -1003,
            f"Way too many requests; IP({ip}) banned until {until_ms}. "
            "Please use the websocket for live updates to avoid bans.",
        )
    )


def fault_reply(fault: Fault, ip: str) -> Reply:
    """The reply an injected fault stands for (every kind but latency)."""
    p = fault.params
    if fault.kind == "status":
        status = int(p["status"])
        body = p.get("body")
        if body is None:
            if status == 502:
                return Reply(status, BAD_GATEWAY_HTML.encode(), HTML)
            return json_reply(status, UNKNOWN_ERROR)
        return Reply(status, str(body).encode(), p.get("content_type") or _sniff(str(body)))
    if fault.kind == "malformed_json":
        return Reply(200, str(p.get("body", MALFORMED_JSON)).encode())
    if fault.kind == "reset":
        reply = json_reply(200, [{"asset": "USDT", "totalWalletBalance": "1.00000000"}] * 20)
        reply.reset_after = int(p.get("after_bytes", len(reply.body) // 2))
        return reply
    if fault.kind == "stall":
        reply = json_reply(200, [])
        reply.stall_seconds = float(p.get("seconds", 60.0))
        return reply
    if fault.kind == "rate_limit":
        reply = error_reply(ApiError(429, -1003, "Too many requests; please use the websocket."))
        if p.get("retry_after") is not None:
            reply.headers["Retry-After"] = str(p["retry_after"])
        return reply
    if fault.kind == "ban":
        reply = ban_reply(ip, int(p["until_ms"]))
        if p.get("retry_after") is not None:
            reply.headers["Retry-After"] = str(p["retry_after"])
        return reply
    if fault.kind == "api_error":
        error = ApiError(int(p.get("status", 400)), int(p["code"]), str(p.get("msg", "")))
        return error_reply(error)
    if fault.kind == "raw":
        body = str(p["body"])
        content_type = p.get("content_type") or _sniff(body)
        headers = dict(p.get("headers", {}))
        return Reply(int(p.get("status", 200)), body.encode(), content_type, headers)
    raise AssertionError(f"no reply for fault kind {fault.kind}")


def _sniff(body: str) -> str:
    try:
        json.loads(body)
    except ValueError:
        return HTML if body.lstrip().startswith("<") else TEXT
    return JSON


def json_reply(status: int, payload: Any) -> Reply:
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode())


def error_reply(error: ApiError) -> Reply:
    return json_reply(error.status, {"code": error.code, "msg": error.msg})
