"""Typed errors of the Binance PM API, by HTTP status and Binance error code.

Each error carries `outcome`, the value of the `outcome` label of
`binance_pm_requests_total`, and what the response said of the IP's used
weight. Messages never contain a request's query string or headers.
"""

from __future__ import annotations

import re

# Binance error codes the exporter branches on.
TOO_MANY_REQUESTS = -1003
TIMESTAMP_OUTSIDE_RECV_WINDOW = -1021
INVALID_SIGNATURE = -1022
LISTEN_KEY_DOES_NOT_EXIST = -1125
AUTH_CODES = frozenset({-1002, -1022, -2014, -2015})

#: ASCII digits: `\d` also matches other scripts' digits, which int() reads as a time
_BAN_UNTIL = re.compile(r"banned until ([0-9]{10,16})")
_QUERY = re.compile(r"\?\S*")


def scrub(text: str) -> str:
    """Drop query strings (timestamp, signature) from text that may quote a URL."""
    return _QUERY.sub("?…", text)


class BinanceError(Exception):
    outcome = "api_error"
    #: backing off after this error is the account's own business (False: the IP's)
    account_fault = True

    def __init__(self, message: str, *, used_weight: int | None = None) -> None:
        super().__init__(scrub(message))
        self.used_weight = used_weight
        #: the endpoint ("balance", "account", "time") whose request failed; set by the client
        self.endpoint = ""


class ApiError(BinanceError):
    """A Binance error body ({"code": ..., "msg": ...}) not covered by a narrower class."""

    def __init__(
        self, status: int, code: int | None, msg: str, *, used_weight: int | None = None
    ) -> None:
        super().__init__(f"HTTP {status}, code {code}: {msg}", used_weight=used_weight)
        self.status = status
        self.code = code
        self.msg = msg


class AuthError(ApiError):
    """Bad API key, permissions, IP whitelist or signature: will not fix itself."""

    outcome = "auth_error"


class TimestampError(ApiError):
    """-1021: our clock (plus offset) is outside the server's recvWindow."""

    outcome = "timestamp_error"


class RateLimited(ApiError):
    """HTTP 429: over the IP's weight limit; pause until `retry_after` s, else the minute's end."""

    outcome = "rate_limited"
    account_fault = False

    def __init__(
        self,
        status: int,
        code: int | None,
        msg: str,
        *,
        retry_after: float | None,
        used_weight: int | None = None,
    ) -> None:
        super().__init__(status, code, msg, used_weight=used_weight)
        self.retry_after = retry_after


class IpBanned(RateLimited):
    """HTTP 418: the IP is banned, until `retry_after` or the time the message names."""

    outcome = "banned"

    @property
    def banned_until(self) -> float | None:
        """The ban's end in epoch seconds of the server's clock, if the message names it."""
        match = _BAN_UNTIL.search(self.msg)
        return int(match.group(1)) / 1000 if match else None


class WafBlocked(RateLimited):
    """HTTP 403: Binance's web application firewall rejected the request. Like a 429 it is
    about the IP, not the account (Binance lists it with the rate limits): pause the IP
    until `retry_after` s, else the minute's end."""

    outcome = "waf_blocked"


class ServerError(BinanceError):
    """HTTP 5xx. For a read-only GET, retrying with backoff is safe."""

    outcome = "server_error"

    def __init__(self, status: int, detail: str, *, used_weight: int | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}", used_weight=used_weight)
        self.status = status


class RequestTimeout(BinanceError):
    outcome = "timeout"


class ConnectionFailed(BinanceError):
    outcome = "connection_error"


class InvalidResponse(BinanceError):
    """The body is not JSON, or not of the shape the endpoint documents."""

    outcome = "invalid_response"


def api_error(
    status: int,
    code: int | None,
    msg: str,
    *,
    retry_after: float | None,
    used_weight: int | None,
) -> BinanceError:
    """The typed error for a non-2xx response, by HTTP status first, then Binance code."""
    if status == 418:
        return IpBanned(status, code, msg, retry_after=retry_after, used_weight=used_weight)
    if status == 403:
        return WafBlocked(status, code, msg, retry_after=retry_after, used_weight=used_weight)
    if status == 429 or code == TOO_MANY_REQUESTS:
        return RateLimited(status, code, msg, retry_after=retry_after, used_weight=used_weight)
    if code == TIMESTAMP_OUTSIDE_RECV_WINDOW:
        return TimestampError(status, code, msg, used_weight=used_weight)
    if code in AUTH_CODES or status == 401:
        return AuthError(status, code, msg, used_weight=used_weight)
    if status >= 500:
        detail = msg if code is None else f"code {code}: {msg}"
        return ServerError(status, detail, used_weight=used_weight)
    return ApiError(status, code, msg, used_weight=used_weight)
