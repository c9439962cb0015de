"""An async client for the Binance Portfolio Margin REST API (read-only endpoints).

It signs requests, maps failures to typed errors and reports every request
(endpoint, outcome, duration, the IP's used weight) to an observer. It knows
nothing of scheduling or budgets: those belong to the poller.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import httpx
from pydantic import SecretStr

from exporter.binance import errors
from exporter.binance.models import ParsedBalances, parse_account, parse_balances, parse_server_time
from exporter.binance.signing import Signer, signed_query
from exporter.binance.spot import TICKER_PRICE_PATH, TRADING_ONLY, parse_ticker_prices
from exporter.binance.transport import route_transport
from exporter.route import DEFAULT, Route
from exporter.snapshot import AccountInfo

BALANCE_PATH = "/papi/v1/balance"
ACCOUNT_PATH = "/papi/v1/account"
LISTEN_KEY_PATH = "/papi/v1/listenKey"
#: the server time: the PM API documents none (`/papi/v1/ping` has no time); Binance
#: documents these two, on the USD-M futures host and on the spot host
FAPI_TIME_PATH = "/fapi/v1/time"
SPOT_TIME_PATH = "/api/v3/time"

_USED_WEIGHT = re.compile(r"x-mbx-used-weight-(\d+)([smhd])", re.IGNORECASE)


@dataclass(frozen=True, repr=False)
class Credentials:
    api_key: SecretStr
    signer: Signer

    def __repr__(self) -> str:
        return f"Credentials(api_key=**********, signer={self.signer.kind})"


@dataclass(frozen=True, slots=True)
class RequestReport:
    """What one request did, for metrics, logs and the weight budget."""

    endpoint: str
    outcome: str
    duration: float
    used_weight: int | None
    #: the request reached the server, and so spent weight there, even if it then failed
    sent: bool = True
    #: the request's weight when the caller gave it (a collector's); else weights.WEIGHTS'
    weight: int | None = None


#: transport errors raised before a request left this host: no weight was spent
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


Observer = Callable[[RequestReport], None]
T = TypeVar("T")


def used_weight_1m(headers: httpx.Headers) -> int | None:
    """The IP's used weight in the current minute (`X-MBX-USED-WEIGHT-1M`), if sent."""
    for name, value in headers.items():
        match = _USED_WEIGHT.fullmatch(name)
        if match and match.group(1) == "1" and match.group(2).lower() == "m":
            try:
                return int(value)
            except ValueError:
                return None
    return None


#: the largest response body read: a balance list of thousands of assets is ~1 KB each
#: at most, so 16 MiB leaves ample room while a broken or hostile server cannot fill memory
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < 7 * 86400 else None


class BinanceClient:
    def __init__(
        self,
        *,
        base_url: str,
        timeout_seconds: float,
        recv_window_ms: int,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
        route: Route = DEFAULT,
    ) -> None:
        if transport is not None and route != DEFAULT:
            raise ValueError("a transport of its own and a route are exclusive")
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout_seconds,
            transport=transport or route_transport(route),
            headers={"Accept": "application/json", "User-Agent": "binance-pm-exporter"},
            follow_redirects=False,
            trust_env=False,
        )
        self._timeout = timeout_seconds
        self._recv_window_ms = recv_window_ms
        self._observer = observer
        self._clock = clock
        #: server clock minus local clock, in seconds; set by exporter.clocksync
        self.clock_offset = 0.0

    async def aclose(self) -> None:
        await self._http.aclose()

    def server_now(self) -> float:
        return self._clock() + self.clock_offset

    async def measure_offset(
        self, url: str, endpoint: str, observer: Observer | None = None
    ) -> float:
        """Binance's clock minus ours (at the round trip's midpoint), from `GET url`
        answering `{"serverTime": ms}`. `url` may be absolute, on another Binance host (the
        futures or spot time endpoint): it still goes through this client's route. The
        request is reported to `observer` (that host's own ledger), not to the client's.
        The caller sets `clock_offset` (exporter.clocksync)."""
        before = self._clock()
        server_time = await self._request(
            "GET", url, endpoint, None, parse_server_time, observer=observer
        )
        after = self._clock()
        return server_time - (before + after) / 2

    async def balance(self, credentials: Credentials) -> ParsedBalances:
        return await self._request("GET", BALANCE_PATH, "balance", credentials, parse_balances)

    async def account(self, credentials: Credentials) -> AccountInfo:
        return await self._request("GET", ACCOUNT_PATH, "account", credentials, parse_account)

    async def read(
        self,
        path: str,
        endpoint: str,
        parse: Callable[[object], T],
        credentials: Credentials,
        *,
        params: tuple[tuple[str, str], ...],
        weight: int,
    ) -> T:
        """A signed GET of `path` with `params` (of `weight`), its answer parsed by `parse`:
        what a collector (exporter/collectors/) declares."""
        return await self._request(
            "GET", path, endpoint, credentials, parse, params=params, weight=weight
        )

    # The user data stream's listenKey: the API key header only, no timestamp, no signature
    # (as Binance's SDK sends them). The key is a bearer token: held as a SecretStr.

    async def open_listen_key(self, api_key: SecretStr) -> SecretStr:
        """POST: a new listenKey, or the account's live one, extended by 60 minutes."""
        return await self._request(
            "POST", LISTEN_KEY_PATH, "listen_key", None, _parse_listen_key, api_key=api_key
        )

    async def keep_listen_key(self, api_key: SecretStr) -> None:
        """PUT: extend the account's listenKey by 60 minutes; -1125 if it has none."""
        await self._request("PUT", LISTEN_KEY_PATH, "listen_key", None, _ignore, api_key=api_key)

    async def close_listen_key(self, api_key: SecretStr) -> None:
        """DELETE: close the account's listenKey."""
        await self._request("DELETE", LISTEN_KEY_PATH, "listen_key", None, _ignore, api_key=api_key)

    async def ticker_prices(self) -> Mapping[str, float]:
        """Every trading spot symbol's last price (`GET /api/v3/ticker/price`, unsigned,
        `symbolStatus=TRADING`): call it on a client whose base_url is the spot API."""
        return await self._request(
            "GET", f"{TICKER_PRICE_PATH}?{TRADING_ONLY}", "ticker_price", None, parse_ticker_prices
        )

    async def _request(
        self,
        method: str,
        path: str,
        endpoint: str,
        credentials: Credentials | None,
        parse: Callable[[object], T],
        *,
        api_key: SecretStr | None = None,
        observer: Observer | None = None,
        params: tuple[tuple[str, str], ...] = (),
        weight: int | None = None,
    ) -> T:
        report = partial(self._report, observer=observer or self._observer, weight=weight)
        headers = {}
        url = path
        if api_key is not None:
            headers["X-MBX-APIKEY"] = api_key.get_secret_value()
        if credentials is not None:
            signed = [
                *params,
                ("recvWindow", str(self._recv_window_ms)),
                ("timestamp", str(int(self.server_now() * 1000))),
            ]
            url = f"{path}?{signed_query(signed, credentials.signer)}"
            headers["X-MBX-APIKEY"] = credentials.api_key.get_secret_value()
        started = time.perf_counter()
        try:
            # httpx's timeout bounds each connect, write and read; this bounds the whole
            # request, so a server trickling its answer byte by byte cannot hold it forever.
            async with (
                asyncio.timeout(self._timeout),
                self._http.stream(method, url, headers=headers) as response,
            ):
                body = await _read_capped(response)
        except (httpx.TimeoutException, TimeoutError) as exc:
            sent = not isinstance(exc, _NOT_SENT)
            error: errors.BinanceError = errors.RequestTimeout(f"{endpoint}: timed out ({exc!r})")
        except (httpx.TransportError, OSError) as exc:
            sent = not isinstance(exc, _NOT_SENT)
            error = errors.ConnectionFailed(f"{endpoint}: {type(exc).__name__}: {exc}")
        else:
            duration = time.perf_counter() - started
            used = used_weight_1m(response.headers)
            try:
                result = parse(_decode(response, body, used))
            except errors.BinanceError as exc:
                exc.used_weight = used
                exc.endpoint = endpoint
                report(endpoint, exc.outcome, duration, used)
                raise
            report(endpoint, "success", duration, used)
            return result
        error.endpoint = endpoint
        report(endpoint, error.outcome, time.perf_counter() - started, None, sent=sent)
        raise error

    @staticmethod
    def _report(
        endpoint: str,
        outcome: str,
        duration: float,
        used: int | None,
        *,
        sent: bool = True,
        observer: Observer | None,
        weight: int | None = None,
    ) -> None:
        if observer is not None:
            observer(RequestReport(endpoint, outcome, duration, used, sent, weight))


def _parse_listen_key(payload: object) -> SecretStr:
    key = payload.get("listenKey") if isinstance(payload, dict) else None
    if not isinstance(key, str) or not key:
        raise errors.InvalidResponse('listenKey: no "listenKey" string in the answer')
    return SecretStr(key)


def _ignore(payload: object) -> None:
    return None


async def _read_capped(response: httpx.Response) -> bytes | None:
    """The body, or None past MAX_RESPONSE_BYTES (read no further)."""
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(response: httpx.Response, body: bytes | None, used_weight: int | None) -> object:
    """The JSON body of a 2xx response, or the typed error of any other."""
    if body is None:
        raise errors.InvalidResponse(
            f"HTTP {response.status_code}: body larger than {MAX_RESPONSE_BYTES} bytes",
            used_weight=used_weight,
        )
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack allows
        payload = None
        malformed = True
    else:
        malformed = False
    status = response.status_code
    if 200 <= status < 300:
        if malformed:
            raise errors.InvalidResponse(
                f"HTTP {status}: body is not JSON", used_weight=used_weight
            )
        return payload
    code = payload.get("code") if isinstance(payload, dict) else None
    msg = payload.get("msg") if isinstance(payload, dict) else None
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    if not isinstance(msg, str):
        msg = response.reason_phrase or "no message"
    raise errors.api_error(
        status,
        code,
        msg[:200],
        retry_after=retry_after_seconds(response.headers),
        used_weight=used_weight,
    )
