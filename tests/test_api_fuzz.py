"""Random API responses: the parsers raise nothing but InvalidResponse, the client nothing but
its typed errors, and no NaN or infinity ever comes out as a value."""

from __future__ import annotations

import contextlib
import json
import math
import string
import sys
from collections.abc import Callable

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from support.mockclient import call_client
from support.strategies import json_like

from exporter import fields
from exporter.binance import errors
from exporter.binance.client import BinanceClient, Credentials
from exporter.binance.models import (
    ParsedBalances,
    parse_account,
    parse_balances,
    parse_server_time,
)
from exporter.binance.signing import HmacSigner
from exporter.budget import MAX_PAUSE_SECONDS, BudgetLimits, WeightBudget
from exporter.snapshot import AccountInfo

pytestmark = pytest.mark.slow

NOW = 1_700_000_000.0

# --- strategies ------------------------------------------------------------------------------

TRICKY_STRINGS = [
    "",
    "0",
    "-0",
    "1.5",
    "-2.25",
    "NaN",
    "nan",
    "-NaN",
    "Infinity",
    "-inf",
    "1e400",
    "-1e400",
    "1E5",
    "0x10",
    "1_000",
    " 1",
    "1 ",
    "+1",
    ".5",
    "5.",
    "\u0661\u0662",  # Arabic-Indic digits
    "\uff11",  # fullwidth 1
    "9" * 40,
    "9" * 41,
    "9" * 400,
    "0." + "1" * 41,
    "-" + "9" * 40 + "." + "9" * 40,
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(TRICKY_STRINGS),
    st.text(max_size=12),
)
json_values = json_like(scalars)
decimals = st.one_of(
    st.sampled_from(TRICKY_STRINGS),
    st.decimals(allow_nan=False, allow_infinity=False, places=8).map(str),
    scalars,
)
millis = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.integers(min_value=0, max_value=10**14),
    scalars,
)
assets = st.one_of(
    st.sampled_from(["USDT", "BTC", "ETH", "BNB"]),
    st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=6),
    scalars,
    st.text(max_size=40),
)


def records(
    table: tuple[fields.Field, ...], *, with_asset: bool
) -> st.SearchStrategy[dict[str, object]]:
    known: dict[str, st.SearchStrategy[object]] = dict.fromkeys((f.api for f in table), decimals)
    known["updateTime"] = millis
    if with_asset:
        known["asset"] = assets
    else:
        known["accountStatus"] = st.one_of(
            st.sampled_from(["NORMAL", "MARGIN_CALL", "BANKRUPTED", "FOO", "", "a b"]), scalars
        )
    return st.fixed_dictionaries({}, optional=known).flatmap(
        lambda record: st.dictionaries(st.text(max_size=8), json_values, max_size=2).map(
            lambda extra: {**extra, **record}
        )
    )


balance_records = records(fields.BALANCE, with_asset=True)
balance_payloads = st.one_of(
    st.lists(st.one_of(balance_records, json_values), max_size=6),
    balance_records,
    json_values,
)
account_payloads = st.one_of(records(fields.ACCOUNT, with_asset=False), json_values)
time_payloads = st.one_of(st.fixed_dictionaries({"serverTime": millis}), json_values)


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def _check_balances(parsed: ParsedBalances) -> None:
    for balance in parsed.balances:
        assert isinstance(balance.asset, str)
        assert balance.asset
        assert all(math.isfinite(v) for v in balance.values.values())
        assert _finite(balance.update_time)


def _check_account(info: AccountInfo) -> None:
    assert all(math.isfinite(v) for v in info.values.values())
    assert _finite(info.update_time)
    assert info.status is None or isinstance(info.status, str)


# --- the parsers -----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(balance_payloads)
def test_parse_balances_raises_only_invalid_response(payload: object) -> None:
    try:
        parsed = parse_balances(payload)
    except errors.InvalidResponse:
        return
    _check_balances(parsed)


@settings(max_examples=300, deadline=None)
@given(account_payloads)
def test_parse_account_raises_only_invalid_response(payload: object) -> None:
    try:
        info = parse_account(payload)
    except errors.InvalidResponse:
        return
    _check_account(info)


@settings(max_examples=200, deadline=None)
@given(time_payloads)
def test_parse_server_time_raises_only_invalid_response(payload: object) -> None:
    try:
        seconds = parse_server_time(payload)
    except errors.InvalidResponse:
        return
    assert math.isfinite(seconds)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_json_text_through_the_decoder(text: str) -> None:
    try:
        payload = json.loads(text)
    except ValueError:
        return
    for parse in (parse_balances, parse_account, parse_server_time):
        with contextlib.suppress(errors.InvalidResponse):
            parse(payload)


def _nested(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


def _deep_stack(depth: int, call: Callable[[], object]) -> object:
    return call() if depth == 0 else _deep_stack(depth - 1, call)


@pytest.mark.parametrize(
    ("parse", "payloads"),
    [
        (parse_balances, lambda deep: [[deep], [{"asset": "BTC", "crossMarginFree": deep}]]),
        (parse_account, lambda deep: [{"uniMMR": deep}, {"accountStatus": deep}, [deep]]),
        (parse_server_time, lambda deep: [{"serverTime": deep}, [deep]]),
    ],
    ids=["balances", "account", "server_time"],
)
def test_deeply_nested_values_are_invalid_not_a_recursion_error(
    parse: Callable[[object], object], payloads: Callable[[object], list[object]]
) -> None:
    """A preview of a bad value must not recurse once per nesting level."""
    deep = _nested(sys.getrecursionlimit() * 3)
    for payload in payloads(deep):
        with pytest.raises(errors.InvalidResponse):
            _deep_stack(sys.getrecursionlimit() // 2, lambda p=payload: parse(p))


def test_only_ascii_digits_are_decimals() -> None:
    with pytest.raises(errors.InvalidResponse):
        parse_balances([{"asset": "BTC", "crossMarginFree": "\u0661\u0662"}])
    parsed = parse_balances(
        [{"asset": "BTC", "crossMarginFree": "\u0661"}, {"asset": "ETH", "crossMarginFree": "1"}]
    )
    assert [b.asset for b in parsed.balances] == ["ETH"]
    assert parsed.skipped_assets == {"BTC"}


# --- the client: any body, status and headers ------------------------------------------------

DEEP_JSON = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError
CREDENTIALS = Credentials(SecretStr("fuzz-api-key"), HmacSigner(SecretStr("fuzz-secret")))

bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    balance_payloads.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.builds(
        lambda code, msg: json.dumps({"code": code, "msg": msg}).encode(),
        st.one_of(st.integers(-10_000, 10), scalars),
        st.one_of(
            st.sampled_from(
                [
                    "IP banned until 1700000060000.",
                    "IP banned until 9999999999999999.",
                    "banned until \u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669\u0660.",
                ]
            ),
            scalars,
        ),
    ),
)
statuses = st.one_of(
    st.sampled_from([200, 400, 401, 403, 404, 418, 429, 500, 502, 503, 504]),
    st.integers(min_value=100, max_value=599),
)
header_values = st.one_of(
    st.sampled_from(["20", "-1", "1e400", "nan", "inf", "9" * 5000, "", " 7 ", "\u0661"]),
    st.text(alphabet=string.printable.strip(), max_size=10),
)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    endpoint=st.sampled_from(["balance", "account", "time"]),
    status=statuses,
    body=bodies,
    used=st.none() | header_values,
    retry_after=st.none() | header_values,
)
@example(endpoint="balance", status=200, body=DEEP_JSON, used=None, retry_after=None)
@example(endpoint="account", status=418, body=b"[" * 990 + b"]" * 990, used=None, retry_after=None)
def test_the_client_raises_only_its_own_errors(
    endpoint: str, status: int, body: bytes, used: str | None, retry_after: str | None
) -> None:
    headers = []  # as bytes, the way they come off the wire
    if used is not None:
        headers.append((b"X-MBX-USED-WEIGHT-1M", used.encode()))
    if retry_after is not None:
        headers.append((b"Retry-After", retry_after.encode()))

    async def call(client: BinanceClient) -> object:
        if endpoint == "time":
            return await client.measure_offset("/fapi/v1/time", "fapi_time")
        fetch = client.balance if endpoint == "balance" else client.account
        return await fetch(CREDENTIALS)

    result, reports = call_client(
        lambda _: httpx.Response(status, content=body, headers=headers), call, timeout=5
    )
    (report,) = reports  # every request is reported, whatever happened
    assert report.used_weight is None or isinstance(report.used_weight, int)
    if isinstance(result, ParsedBalances):
        _check_balances(result)
    elif isinstance(result, AccountInfo):
        _check_account(result)
    elif isinstance(result, float):
        assert math.isfinite(result)
    else:
        assert isinstance(result, errors.BinanceError)
        assert report.outcome == result.outcome
        if isinstance(result, errors.RateLimited):
            _check_pause(result)


def _check_pause(error: errors.RateLimited) -> None:
    """Whatever a 429 or 418 says, the pause it causes is finite and at most 3 days."""
    assert _finite(error.retry_after)
    budget = WeightBudget("default", BudgetLimits(6000, 0.25, 0.8), clock=lambda: NOW)
    if isinstance(error, errors.IpBanned):
        assert _finite(error.banned_until)
        budget.banned(error.retry_after, error.banned_until, NOW, 0.0)
    else:
        budget.rate_limited(error.retry_after, NOW, 0.0)
    assert NOW <= budget.paused_until <= NOW + MAX_PAUSE_SECONDS
