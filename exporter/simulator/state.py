"""What the simulator remembers: account data, injected faults, weight per IP, a request log.

Every class here is thread-safe (the HTTP server answers on many threads) and
knows nothing of HTTP. Times come in as arguments or from an injected clock.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from exporter.simulator import events, synthetic
from exporter.simulator.auth import SimAccount

MINUTE_MS = 60_000
FIRST_BAN_MS = 2 * MINUTE_MS
MAX_BAN_MS = 3 * 24 * 60 * MINUTE_MS
REQUEST_LOG_SIZE = 100_000
LISTEN_KEY_TTL_MS = 60 * MINUTE_MS
MAX_CONNECTION_SECONDS = 24 * 3600.0

#: the futures books served (GET /papi/v1/um/account, /papi/v1/cm/account)
FUTURES_BOOKS = ("um", "cm")
#: open positions per book and account at start (the demo's drift moves their marks)
POSITIONS_PER_BOOK = 3

#: pushes an account's events to its stream connections: publish(account, events)
Publish = Callable[[str, list[dict[str, Any]]], None]


class UnknownAccountError(LookupError):
    """An account name the simulator was not given."""


# ---------------------------------------------------------------- account data


class AccountBook:
    """Each account's /papi/v1/balance records and /papi/v1/account object, as raw JSON.

    Stored exactly as served, so tests can put in shapes the API should never
    send (numbers for strings, nulls, an object where an array belongs).
    """

    def __init__(
        self,
        accounts: Iterable[SimAccount],
        *,
        assets_per_account: int,
        seed: int,
        now_ms: Callable[[], int],
        publish: Publish | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._now_ms = now_ms
        self._publish = publish
        self._update_ids = itertools.count(1)
        self._by_key: dict[str, SimAccount] = {}
        self._balances: dict[str, Any] = {}
        self._info: dict[str, Any] = {}
        #: name -> book ("um", "cm") -> GET /papi/v1/{book}/account
        self._futures: dict[str, dict[str, Any]] = {}
        for account in accounts:
            if account.name in self._balances:
                raise ValueError(f"duplicate account name: {account.name}")
            if account.api_key in self._by_key:
                raise ValueError(f"account {account.name}: API key already used")
            self._by_key[account.api_key] = account
            rng = random.Random(f"{seed}:{account.name}")  # noqa: S311 - made-up data, not crypto
            portfolio = synthetic.make_portfolio(rng, assets_per_account, now_ms())
            self._balances[account.name] = [asset.record() for asset in portfolio]
            risk = synthetic.make_risk(rng)
            self._info[account.name] = synthetic.account_info(portfolio, risk, now_ms())
            futures_rng = random.Random(f"{seed}:{account.name}:futures")  # noqa: S311
            self._futures[account.name] = {
                book: synthetic.futures_account(
                    book,
                    portfolio,
                    synthetic.make_positions(futures_rng, book, POSITIONS_PER_BOOK, now_ms()),
                    now_ms(),
                )
                for book in FUTURES_BOOKS
            }

    @property
    def names(self) -> list[str]:
        return list(self._balances)

    def by_key(self, api_key: str | None) -> SimAccount | None:
        return self._by_key.get(api_key) if api_key else None

    def balances(self, name: str) -> Any:
        with self._lock:
            self._check(name)
            return copy.deepcopy(self._balances[name])

    def account_info(self, name: str) -> Any:
        with self._lock:
            self._check(name)
            return copy.deepcopy(self._info[name])

    def futures_account(self, name: str, book: str) -> Any:
        """GET /papi/v1/{book}/account of account `name` (book "um" or "cm")."""
        with self._lock:
            self._check(name)
            return copy.deepcopy(self._futures[name][book])

    def set_futures_account(self, name: str, book: str, payload: Any) -> None:
        if book not in FUTURES_BOOKS:
            raise ValueError(f"unknown futures book: {book}")
        stored = _json_copy(payload)
        with self._lock:
            self._check(name)
            self._futures[name][book] = stored

    def set_balances(self, name: str, records: Any) -> None:
        stored = _json_copy(records)
        with self._lock:
            self._check(name)
            self._replace_balances(name, stored)

    def set_asset(self, name: str, asset: str, fields: dict[str, Any]) -> None:
        """Update one asset's fields, or add the asset (zero amounts, then `fields`)."""
        update = _json_copy(fields)
        with self._lock:
            self._check(name)
            records = copy.deepcopy(self._balances[name])
            if not isinstance(records, list):
                records = []
            for record in records:
                if isinstance(record, dict) and record.get("asset") == asset:
                    record.update(update)
                    break
            else:
                records.append({**_zero_record(asset), **update})
            self._replace_balances(name, records)

    def remove_asset(self, name: str, asset: str) -> None:
        with self._lock:
            self._check(name)
            records = self._balances[name]
            if isinstance(records, list):
                kept = [r for r in records if not (isinstance(r, dict) and r.get("asset") == asset)]
                self._replace_balances(name, kept)

    def trade(self, name: str, asset: str, wallet_change: Decimal, free_change: Decimal) -> bool:
        """A fill on `name`'s `asset`: its UM wallet and cross-margin free balance move by
        the changes, and the events of a fill are pushed. Refused (False, nothing changes)
        on an account driven negative (a non-zero negativeBalance or a balance below zero)
        and on an asset it does not hold in the API's shape."""
        with self._lock:
            self._check(name)
            records = self._balances[name]
            if not isinstance(records, list) or any(_in_debt(r) for r in records):
                return False
            index = next(
                (
                    i
                    for i, r in enumerate(records)
                    if isinstance(r, dict) and r.get("asset") == asset
                ),
                None,
            )
            if index is None:
                return False
            record = records[index]
            changed = _traded(record, wallet_change, free_change)
            if changed is None:
                return False
            self._balances[name] = [*records[:index], changed, *records[index + 1 :]]
            update_id = next(self._update_ids)
            self._announce(
                name, events.trade_events(asset, record, changed, self._now_ms(), update_id)
            )
            return True

    def set_account_info(self, name: str, info: Any) -> None:
        stored = _json_copy(info)
        with self._lock:
            self._check(name)
            old, self._info[name] = self._info[name], stored
            self._announce(name, events.risk_events(old, stored, self._now_ms()))

    def _replace_balances(self, name: str, records: Any) -> None:
        """Store new records and push their events; call with the lock held."""
        old, self._balances[name] = self._balances[name], records
        if self._publish is not None:
            update_id = next(self._update_ids)
            self._announce(name, events.balance_events(old, records, self._now_ms(), update_id))

    def _announce(self, name: str, pushed: list[dict[str, Any]]) -> None:
        # Under the lock, so that one account's events leave in the order of its changes;
        # publish only hands them over (it never blocks).
        if pushed and self._publish is not None:
            self._publish(name, pushed)

    def _check(self, name: str) -> None:
        if name not in self._balances:
            raise UnknownAccountError(f"unknown account: {name}")


def _json_copy(value: Any) -> Any:
    """A private copy; refuses what cannot be served as JSON (NaN and Infinity are allowed)."""
    return json.loads(json.dumps(value))


#: the fields a negative balance shows in; any below zero means the account is in debt
_DEBT_FIELDS = ("crossMarginFree", "umWalletBalance", "cmWalletBalance", "totalWalletBalance")


def _in_debt(record: Any) -> bool:
    if not isinstance(record, dict):
        return True
    if _number(record.get("negativeBalance", "0")) != 0:
        return True
    return any((_number(record.get(name, "0")) or 0) < 0 for name in _DEBT_FIELDS)


def _number(value: Any) -> Decimal | None:
    try:
        number = Decimal(str(value)) if value not in (None, "") else Decimal(0)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _traded(record: dict[str, Any], wallet: Decimal, free: Decimal) -> dict[str, Any] | None:
    """`record` after a fill moving its UM wallet by `wallet` and its free balance by
    `free`, the API's identities kept; None when its amounts are not decimals."""
    names = ("umWalletBalance", "crossMarginFree", "crossMarginLocked", "cmWalletBalance")
    um, cross_free, locked, cm = (_number(record.get(n, "0")) for n in names)
    if um is None or cross_free is None or locked is None or cm is None:
        return None
    um, cross_free = um + wallet, cross_free + free
    return {
        **record,
        "umWalletBalance": synthetic.format_amount(um),
        "crossMarginFree": synthetic.format_amount(cross_free),
        "crossMarginAsset": synthetic.format_amount(cross_free + locked),
        "totalWalletBalance": synthetic.format_amount(cross_free + locked + um + cm),
    }


def _zero_record(asset: str) -> dict[str, Any]:
    zero = "0.00000000"
    return {
        "asset": asset,
        "totalWalletBalance": zero,
        "crossMarginAsset": zero,
        "crossMarginBorrowed": zero,
        "crossMarginFree": zero,
        "crossMarginInterest": zero,
        "crossMarginLocked": zero,
        "umWalletBalance": zero,
        "umUnrealizedPNL": zero,
        "cmWalletBalance": zero,
        "cmUnrealizedPNL": "",
        "updateTime": 0,
        "negativeBalance": "0",
    }


# ---------------------------------------------------------------- spot prices

#: paths of the spot API (api.binance.com) and of the USD-M futures API (fapi.binance.com,
#: asked only for the server time): each a weight pool of its own, and faults injected
#: without an endpoint do not reach them
SPOT_PREFIX = "/api/"
FAPI_PREFIX = "/fapi/"
#: the USD-M futures API's request-weight limit per IP and minute (Binance's docs)
FAPI_WEIGHT_LIMIT = 2400
#: a spot symbol's trading status (`status` in exchangeInfo), as the ticker's `symbolStatus`
#: filter takes it (Binance's docs: TRADING, HALT, BREAK)
SYMBOL_STATUSES = ("TRADING", "HALT", "BREAK")


class PriceBoard:
    """The spot API's last price per symbol, as decimal strings (any JSON value allowed),
    and each symbol's trading status. As on Binance, the ticker keeps listing a symbol that
    stopped trading (BREAK) at its last price; only `symbolStatus` leaves it out."""

    def __init__(self, prices: dict[str, Any]) -> None:
        self._lock = threading.Lock()
        self._prices = dict(prices)
        self._status: dict[str, str] = {}  # symbols absent here are TRADING

    def ticker(self, status: str | None = None) -> list[dict[str, Any]]:
        """GET /api/v3/ticker/price without `symbol`; with `symbolStatus`, only the symbols
        in that status."""
        with self._lock:
            return [
                {"symbol": s, "price": p}
                for s, p in self._prices.items()
                if status is None or self._status.get(s, "TRADING") == status
            ]

    def set(self, symbol: str, price: Any) -> None:
        """Set a symbol's price; None removes the symbol."""
        with self._lock:
            if price is None:
                self._prices.pop(symbol, None)
                self._status.pop(symbol, None)
            else:
                self._prices[symbol] = _json_copy(price)

    def set_status(self, symbol: str, status: str) -> None:
        """Set a listed symbol's trading status (TRADING, HALT or BREAK); it keeps its price."""
        if status not in SYMBOL_STATUSES:
            raise ValueError(f"symbol status must be one of {', '.join(SYMBOL_STATUSES)}")
        with self._lock:
            if symbol not in self._prices:
                raise ValueError(f"no such symbol: {symbol}")
            self._status[symbol] = status


# ---------------------------------------------------------------- faults

# kind -> (required params, optional params)
FAULT_PARAMS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "latency": (frozenset({"seconds"}), frozenset()),
    "status": (frozenset({"status"}), frozenset({"body", "content_type"})),
    "malformed_json": (frozenset(), frozenset({"body"})),
    "reset": (frozenset(), frozenset({"after_bytes"})),
    "stall": (frozenset(), frozenset({"seconds"})),
    "rate_limit": (frozenset(), frozenset({"retry_after"})),
    "ban": (frozenset({"until_ms"}), frozenset({"retry_after"})),
    "api_error": (frozenset({"code"}), frozenset({"status", "msg"})),
    "raw": (frozenset({"body"}), frozenset({"status", "headers", "content_type"})),
}
FAULT_KINDS = tuple(FAULT_PARAMS)

_NUMBER_PARAMS = frozenset({"seconds"})
_INT_PARAMS = frozenset({"status", "after_bytes", "retry_after", "until_ms", "code"})
_STR_PARAMS = frozenset({"body", "content_type", "msg"})


@dataclass
class Fault:
    """One injected misbehaviour. `remaining` None means until cleared."""

    kind: str
    endpoint: str | None
    account: str | None
    remaining: int | None
    params: dict[str, Any] = field(default_factory=dict)

    def matches(self, path: str, account: str | None) -> bool:
        """A fault without an endpoint matches every PM API path, never a spot or fapi one:
        those are other hosts, and only a fault naming their path reaches them."""
        if self.endpoint is None:
            at_path = not path.startswith((SPOT_PREFIX, FAPI_PREFIX))
        else:
            at_path = self.endpoint == path
        return at_path and (self.account is None or self.account == account)


def make_fault(
    kind: str,
    *,
    endpoint: str | None,
    account: str | None,
    count: int | None,
    params: dict[str, Any],
) -> Fault:
    """Validate a fault's description; raise ValueError naming what is wrong."""
    _check_kind("fault", kind, params, FAULT_PARAMS, FAULT_KINDS)
    for name, value in params.items():
        _check_param(kind, name, value)
    if endpoint is not None and (not isinstance(endpoint, str) or not endpoint.startswith("/")):
        raise ValueError(f"fault {kind}: endpoint must be a path like /papi/v1/balance")
    if count is not None and (not _is_int(count) or count < 1):
        raise ValueError(f"fault {kind}: count must be a positive integer or None")
    return Fault(kind, endpoint, account, count, dict(params))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_kind(
    what: str,
    kind: str,
    params: Mapping[str, Any],
    table: Mapping[str, tuple[frozenset[str], frozenset[str]]],
    kinds: Iterable[str],
) -> None:
    """`kind` is in `table` and `params` has its required names and no others."""
    if kind not in table:
        raise ValueError(f"unknown {what} kind {kind!r}; known: {', '.join(kinds)}")
    required, optional = table[kind]
    missing = required - params.keys()
    if missing:
        raise ValueError(f"{what} {kind}: missing {', '.join(sorted(missing))}")
    unknown = params.keys() - required - optional
    if unknown:
        raise ValueError(f"{what} {kind}: unknown parameter {', '.join(sorted(unknown))}")


def _check_param(kind: str, name: str, value: object) -> None:
    if name in _NUMBER_PARAMS:
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        )
    elif name in _INT_PARAMS:
        ok = _is_int(value)
    elif name in _STR_PARAMS:
        ok = isinstance(value, str)
    else:  # headers
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
    if not ok:
        raise ValueError(f"fault {kind}: bad value for {name}: {value!r}")


class FaultTable:
    """Injected faults, first injected first matched."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, path: str, account: str | None) -> Fault | None:
        """The fault for this request, if any; counts it down."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(path, account):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
            return None


# ---------------------------------------------------------------- request weight


@dataclass(frozen=True)
class Admission:
    """The weight limiter's verdict. status 200 = admitted, 429 or 418 = refused."""

    status: int
    retry_after: int | None = None
    banned_until_ms: int | None = None


@dataclass
class _IpMinute:
    minute: int = -1
    used: int = 0
    refusals: int = 0  # 429s answered in this minute
    banned_until_ms: int = 0
    bans: int = 0  # each ban lasts twice as long as the one before


class WeightLimiter:
    """Request weight per client IP per calendar minute, shared by every key on that IP.

    Past the limit a request gets 429; after `ban_after_429s` of them in one
    minute the next one bans the IP (418) for 2 minutes, doubling per ban up to
    3 days. Refused requests add no weight.
    """

    def __init__(self, limit: int, *, ban_after_429s: int = 3) -> None:
        self.limit = limit
        self.ban_after_429s = ban_after_429s
        self._lock = threading.Lock()
        self._ips: dict[str, _IpMinute] = {}

    def admit(self, ip: str, weight: int, now_ms: int) -> Admission:
        with self._lock:
            state = self._current(ip, now_ms)
            if state.banned_until_ms > now_ms:
                return _banned(state, now_ms)
            if state.used + weight <= self.limit:
                state.used += weight
                return Admission(200)
            if state.refusals < self.ban_after_429s:
                state.refusals += 1
                next_minute = (now_ms // MINUTE_MS + 1) * MINUTE_MS
                return Admission(429, retry_after=_seconds_until(next_minute, now_ms))
            state.banned_until_ms = now_ms + min(FIRST_BAN_MS * 2**state.bans, MAX_BAN_MS)
            state.bans += 1
            return _banned(state, now_ms)

    def used(self, ip: str, now_ms: int) -> int:
        with self._lock:
            return self._current(ip, now_ms).used

    def add(self, ip: str, weight: int, now_ms: int) -> None:
        with self._lock:
            self._current(ip, now_ms).used += weight

    def _current(self, ip: str, now_ms: int) -> _IpMinute:
        state = self._ips.setdefault(ip, _IpMinute())
        minute = now_ms // MINUTE_MS
        if state.minute != minute:
            state.minute, state.used, state.refusals = minute, 0, 0
        return state


def _banned(state: _IpMinute, now_ms: int) -> Admission:
    until = state.banned_until_ms
    return Admission(418, retry_after=_seconds_until(until, now_ms), banned_until_ms=until)


def _seconds_until(then_ms: int, now_ms: int) -> int:
    return max(1, -(-(then_ms - now_ms) // 1000))


# ---------------------------------------------------------------- request log


@dataclass(frozen=True)
class RequestRecord:
    """One request the simulator answered. status 0: the connection was reset mid-response."""

    time: float
    client_ip: str
    method: str
    path: str
    account: str | None
    status: int
    weight: int


class RequestLog:
    """The last `size` requests, oldest first."""

    def __init__(self, size: int = REQUEST_LOG_SIZE) -> None:
        self._lock = threading.Lock()
        self._records: deque[RequestRecord] = deque(maxlen=size)

    def append(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)


# ---------------------------------------------------------------- the user data stream


class ListenKeys:
    """Each account's listenKey and when it expires; at most one live key per account."""

    def __init__(self, ttl_ms: int = LISTEN_KEY_TTL_MS) -> None:
        self.ttl_ms = ttl_ms
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[str, int]] = {}  # account -> (key, expires at ms)

    def open(self, account: str, now_ms: int) -> str:
        """POST: the account's live key extended, or a new one."""
        with self._lock:
            live = self._live(account, now_ms)
            key = live if live is not None else secrets.token_hex(32)
            self._keys[account] = (key, now_ms + self.ttl_ms)
            return key

    def extend(self, account: str, now_ms: int, key: str | None = None) -> bool:
        """PUT: False when the account has no live key (or `key` is not it): -1125."""
        with self._lock:
            live = self._named(account, now_ms, key)
            if live is not None:
                self._keys[account] = (live, now_ms + self.ttl_ms)
            return live is not None

    def close(self, account: str, now_ms: int, key: str | None = None) -> bool:
        """DELETE: False when there is no such live key."""
        with self._lock:
            live = self._named(account, now_ms, key)
            if live is not None:
                del self._keys[account]
            return live is not None

    def _named(self, account: str, now_ms: int, key: str | None) -> str | None:
        """The account's live key, if `key` (when given) is it; under the lock."""
        live = self._live(account, now_ms)
        return None if live is None or (key is not None and key != live) else live

    def forget(self, account: str) -> str | None:
        """Drop the account's key at once (an expiry fault); return it."""
        with self._lock:
            entry = self._keys.pop(account, None)
            return entry[0] if entry else None

    def account_of(self, key: str, now_ms: int) -> str | None:
        with self._lock:
            for account, (live, expires_ms) in self._keys.items():
                if live == key and expires_ms > now_ms:
                    return account
            return None

    def key_of(self, account: str, now_ms: int) -> str | None:
        with self._lock:
            return self._live(account, now_ms)

    def next_expiry_ms(self) -> int | None:
        """When the first key expires (past ones included), or None without keys."""
        with self._lock:
            return min((until for _, until in self._keys.values()), default=None)

    def take_expired(self, now_ms: int) -> list[tuple[str, str]]:
        """(account, key) of every key past its time, forgotten."""
        with self._lock:
            gone = [(a, key) for a, (key, until) in self._keys.items() if until <= now_ms]
            for account, _ in gone:
                del self._keys[account]
            return gone

    def _live(self, account: str, now_ms: int) -> str | None:
        entry = self._keys.get(account)
        return entry[0] if entry is not None and entry[1] > now_ms else None


@dataclass(frozen=True)
class Push:
    """What the WebSocket server does to an account's connections.

    kind "text": send `text`; "drop": cut the TCP connection without a close frame;
    "expired": send `text` (a listenKeyExpired event) on connections opened with
    `listen_key`, then close them. Notices, for a server that sleeps until something is
    due rather than sweeping: "max_age", the maximum connection age changed; "silent",
    the account's connections went silent (the client's pings start to matter).
    """

    kind: str
    text: str = ""
    listen_key: str = field(default="", repr=False)


#: pushes that only tell a server that a setting changed: nothing goes on the wire
NOTICES = frozenset({"max_age", "silent"})

#: stream fault kind -> (required params, optional params)
STREAM_FAULT_PARAMS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "drop": (frozenset(), frozenset()),
    "expire_key": (frozenset(), frozenset()),
    "forget_key": (frozenset(), frozenset()),
    "refuse_upgrades": (frozenset(), frozenset({"count", "status"})),
    "silent": (frozenset(), frozenset()),
    "malformed": (frozenset(), frozenset({"body"})),
    "unknown_event": (frozenset(), frozenset()),
    "big_frame": (frozenset(), frozenset({"bytes"})),
    "max_age": (frozenset({"seconds"}), frozenset()),
}
STREAM_FAULT_KINDS = tuple(STREAM_FAULT_PARAMS)
MALFORMED_FRAME = '{"e":"ACCOUNT_UPDATE","E":17000000'
BIG_FRAME_BYTES = 1_000_000


class StreamControls:
    """The stream's faults and settings, and the hand-over of pushes to the WebSocket server.

    Read by the server's thread, set by the admin API's threads and the tests.
    """

    def __init__(self, max_connection_seconds: float = MAX_CONNECTION_SECONDS) -> None:
        self._lock = threading.Lock()
        self._listener: Callable[[str | None, Push], None] | None = None
        self.max_connection_seconds = max_connection_seconds
        self._refusals: int | None = 0  # upgrades still to refuse; None: until cleared
        self.refusal_status = 503
        self._silent: set[str | None] = set()  # None: every account

    def attach(self, listener: Callable[[str | None, Push], None] | None) -> None:
        with self._lock:
            self._listener = listener

    def push(self, account: str | None, push: Push) -> None:
        """Hand `push` to the server for `account` (None: every account); a no-op without one."""
        with self._lock:
            listener = self._listener
        if listener is not None:
            listener(account, push)

    def publish(self, account: str, pushed: list[dict[str, Any]]) -> None:
        for event in pushed:
            self.push(account, Push("text", json.dumps(event, separators=(",", ":"))))

    def take_refusal(self) -> int | None:
        """The HTTP status to refuse this upgrade with, or None to accept it."""
        with self._lock:
            if self._refusals == 0:
                return None
            if self._refusals is not None:
                self._refusals -= 1
            return self.refusal_status

    def refuse_upgrades(self, count: int | None, status: int) -> None:
        with self._lock:
            self._refusals, self.refusal_status = count, status

    def silence(self, account: str | None) -> None:
        with self._lock:
            self._silent.add(account)

    def is_silent(self, account: str) -> bool:
        with self._lock:
            return None in self._silent or account in self._silent

    def clear(self) -> None:
        """End refusals and silence."""
        with self._lock:
            self._refusals = 0
            self._silent.clear()


# ---------------------------------------------------------------- all of it


class SimState:
    """Everything the request handlers read and change, and the server's clock."""

    def __init__(
        self,
        accounts: Iterable[SimAccount],
        *,
        clock: Callable[[], float],
        ip_weight_limit: int,
        assets_per_account: int,
        seed: int,
        ban_after_429s: int,
        max_connection_seconds: float = MAX_CONNECTION_SECONDS,
        spot_weight_limit: int = 6000,
    ) -> None:
        self.clock = clock
        self.clock_offset_ms = 0  # server clock = clock() + offset
        self.stream = StreamControls(max_connection_seconds)
        self.listen_keys = ListenKeys()
        self.book = AccountBook(
            accounts,
            assets_per_account=assets_per_account,
            seed=seed,
            now_ms=self.now_ms,
            publish=self.stream.publish,
        )
        self.faults = FaultTable()
        self.weights = WeightLimiter(ip_weight_limit, ban_after_429s=ban_after_429s)
        #: the spot API counts weight apart from the PM API, per IP too
        self.spot_weights = WeightLimiter(spot_weight_limit, ban_after_429s=ban_after_429s)
        #: and so does the USD-M futures API (only its server time is served)
        self.fapi_weights = WeightLimiter(FAPI_WEIGHT_LIMIT, ban_after_429s=ban_after_429s)
        self.prices = PriceBoard(synthetic.spot_ticker(max(assets_per_account, 64)))
        self.log = RequestLog()

    def now_ms(self) -> int:
        """The server's clock in epoch milliseconds."""
        return int(self.clock() * 1000) + self.clock_offset_ms

    def weights_of(self, path: str) -> WeightLimiter:
        """The weight pool a request to `path` counts in: the spot API's, the futures
        API's, or the PM API's."""
        if path.startswith(SPOT_PREFIX):
            return self.spot_weights
        if path.startswith(FAPI_PREFIX):
            return self.fapi_weights
        return self.weights

    def inject_fault(
        self,
        kind: str,
        *,
        endpoint: str | None = None,
        account: str | None = None,
        count: int | None = None,
        **params: Any,
    ) -> None:
        if account is not None and account not in self.book.names:
            raise UnknownAccountError(f"unknown account: {account}")
        fault = make_fault(kind, endpoint=endpoint, account=account, count=count, params=params)
        self.faults.add(fault)

    def stream_fault(self, kind: str, *, account: str | None = None, **params: Any) -> None:
        """Misbehave on the user data stream; see STREAM_FAULT_PARAMS for kinds and params."""
        _check_kind("stream fault", kind, params, STREAM_FAULT_PARAMS, STREAM_FAULT_KINDS)
        if account is not None and account not in self.book.names:
            raise UnknownAccountError(f"unknown account: {account}")
        self._stream_fault(kind, account, params)

    def _stream_fault(self, kind: str, account: str | None, params: dict[str, Any]) -> None:
        now_ms = self.now_ms()
        if kind == "drop":
            self.stream.push(account, Push("drop"))
        elif kind == "expire_key":
            for name in [account] if account is not None else self.book.names:
                key = self.listen_keys.forget(name)
                if key is not None:
                    text = json.dumps(events.listen_key_expired_as_seen(key, now_ms))
                    self.stream.push(name, Push("expired", text, key))
        elif kind == "forget_key":  # the key vanishes without a word: keep-alive gets -1125
            for name in [account] if account is not None else self.book.names:
                self.listen_keys.forget(name)
        elif kind == "refuse_upgrades":
            count, status = params.get("count"), params.get("status", 503)
            if (count is not None and (not _is_int(count) or count < 1)) or not _is_int(status):
                raise ValueError("stream fault refuse_upgrades: count and status are integers")
            self.stream.refuse_upgrades(count, status)
        elif kind == "silent":
            self.stream.silence(account)
            self.stream.push(account, Push("silent"))
        elif kind == "malformed":
            body = params.get("body", MALFORMED_FRAME)
            if not isinstance(body, str):
                raise ValueError("stream fault malformed: body must be a string")
            self.stream.push(account, Push("text", body))
        elif kind in ("unknown_event", "big_frame"):
            size = params.get("bytes", BIG_FRAME_BYTES) if kind == "big_frame" else 0
            if not _is_int(size) or size < 0:
                raise ValueError("stream fault big_frame: bytes must be a non-negative integer")
            event = events.unknown_event(now_ms, padding=size)
            self.stream.push(account, Push("text", json.dumps(event)))
        else:  # max_age
            seconds = params["seconds"]
            _check_param(kind, "seconds", seconds)
            self.stream.max_connection_seconds = float(seconds)
            self.stream.push(None, Push("max_age"))
