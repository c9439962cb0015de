"""Basic auth: who may pass, decided once per request by one gate.

`BasicAuth` holds a web config's users and two caches of verdicts, keyed by an
HMAC-SHA-256 of username and password under a key drawn at start (never the
password itself): the last verified credentials of each user, and the last
CACHE_SIZE failures (as exporter-toolkit keeps 100 verdicts). A scrape with the
same credentials, or a flood repeating one wrong password, costs a hash and a
lookup, not a bcrypt run; a flood of ever new wrong passwords cannot push a
verified user out (failures are kept apart). An unknown user costs a bcrypt run
against a hash of the users' most common cost and never passes. When a web
config is reloaded, a user whose hash did not change keeps its verified
credentials (`adopt`).

`AuthGate` answers each request allowed, denied (401, or 429 when the queue is
full) or pending: a bcrypt check to run. Checks run one at a time in one thread,
so a flood costs one core at most. Credentials that verified before (under any
web config since start) go first; unknown ones queue behind, at most
MAX_CHECKS_PER_PEER from one source address and MAX_CHECKS in all, so one
address cannot fill the queue. They take turns by source address (round robin):
a flood from one address delays another's check by two bcrypt runs at most (the
one running, then one more), however many it has queued. A check whose client
hung up while it waited is skipped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import hmac
import secrets
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import bcrypt

from exporter.http.messages import Request, Response, text_response

CheckPw = Callable[[bytes, bytes], bool]
"""`bcrypt.checkpw`'s shape: (password, hashed) -> matches. Injectable for tests."""

#: distinct wrong credentials remembered (exporter-toolkit keeps 100 verdicts)
CACHE_SIZE = 100
#: unknown credentials waiting for (or in) the bcrypt thread, in all; more get 429
MAX_CHECKS = 8
#: ... and from one source address
MAX_CHECKS_PER_PEER = 4
#: credentials that verified before, remembered to go first after a reload changed a hash
REMEMBERED = 64
_BCRYPT_MAX_PASSWORD = 72  # bytes; longer passwords would be truncated, so they never match

DENIED = text_response(
    401, "unauthorized\n", ("WWW-Authenticate", 'Basic realm="binance-pm-exporter"')
)
TOO_MANY_CHECKS = text_response(429, "too many authentication attempts\n", ("Retry-After", "1"))


def parse_basic_authorization(authorization: str | None) -> tuple[str, bytes] | None:
    """(username, password) from an `Authorization: Basic ...` header value, else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    username, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return username.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


def bcrypt_cost(hashed: bytes) -> int:
    return int(hashed[4:6])


@dataclass(frozen=True)
class Pending:
    """Credentials the cache does not know: `BasicAuth.verify` runs bcrypt on them."""

    key: bytes = field(repr=False)
    username: str
    password: bytes = field(repr=False)


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes, caching recent verdicts.

    `verdict()` is cheap and answers from the cache or the header's shape; `verify()`
    runs bcrypt (callers bound how many run: the gate, one at a time); `check()` does both.
    """

    def __init__(self, users: Mapping[str, bytes], *, checkpw: CheckPw = bcrypt.checkpw) -> None:
        self._users = dict(users)
        self._checkpw = checkpw
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}
        self._failed: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._decoy = decoy(self._users.values())

    def __repr__(self) -> str:
        return f"BasicAuth(users={len(self._users)})"

    @property
    def decoy_cost(self) -> int | None:
        """The bcrypt cost an unknown user's check takes (None: no users)."""
        return bcrypt_cost(self._decoy) if self._decoy else None

    def adopt(self, previous: BasicAuth) -> None:
        """Keep `previous`'s verified credentials of every user whose hash is unchanged
        (a reloaded web config: a rotated certificate must not cost a scraper its login)."""
        with previous._lock:
            key, verified = previous._cache_key, dict(previous._verified)
        with self._lock:
            self._cache_key = key
            self._failed.clear()
            self._verified = {
                user: digest
                for user, digest in verified.items()
                if user in self._users
                and hmac.compare_digest(self._users[user], previous._users[user])
            }

    def verdict(self, authorization: str | None) -> bool | Pending:
        """True or False when known without bcrypt, else the check `verify()` must run."""
        credentials = parse_basic_authorization(authorization)
        if credentials is None:
            return False
        username, password = credentials
        if len(password) > _BCRYPT_MAX_PASSWORD:
            return False
        key = self._digest(username, password)
        known = self._known(username, key)
        return Pending(key, username, password) if known is None else known

    def _known(self, username: str, key: bytes) -> bool | None:
        with self._lock:
            verified = self._verified.get(username)
            if verified is not None and hmac.compare_digest(verified, key):
                return True
            if key in self._failed:
                self._failed.move_to_end(key)
                return False
        return None

    def verify(self, pending: Pending) -> bool:
        """Run bcrypt for `pending` (blocking) and remember the verdict."""
        known = self._known(pending.username, pending.key)  # the same may have been checked
        if known is not None:
            return known
        hashed = self._users.get(pending.username)
        try:
            matches = self._checkpw(pending.password, self._decoy if hashed is None else hashed)
        except ValueError:  # bcrypt refusing its input is a failed login, not a 500
            matches = False
        verdict = matches and hashed is not None
        with self._lock:
            if verdict:
                self._verified[pending.username] = pending.key
            else:
                self._failed[pending.key] = None
                while len(self._failed) > CACHE_SIZE:
                    self._failed.popitem(last=False)
        return verdict

    def check(self, authorization: str | None) -> bool:
        """Whether `authorization` holds a user's credentials (may run bcrypt, blocking)."""
        verdict = self.verdict(authorization)
        return self.verify(verdict) if isinstance(verdict, Pending) else verdict

    def _digest(self, username: str, password: bytes) -> bytes:
        name = username.encode("utf-8")
        message = len(name).to_bytes(4, "big") + name + password
        return hmac.new(self._cache_key, message, hashlib.sha256).digest()


def decoy(given: Iterable[bytes]) -> bytes:
    """The hash an unknown user is checked against: one of the users' most common cost
    (the highest of those on a tie), so that an unknown user takes as long as most known
    ones. Users of another cost still answer in another time: give every user one cost."""
    hashes = list(given)
    by_cost: dict[int, bytes] = {}
    for hashed in hashes:
        by_cost.setdefault(bcrypt_cost(hashed), hashed)
    if not by_cost:
        return b""
    counts = Counter(bcrypt_cost(h) for h in hashes)
    cost = max(counts, key=lambda c: (counts[c], c))
    return by_cost[cost]


@dataclass(frozen=True)
class Check:
    """A bcrypt check the gate admitted: its place is held until `AuthGate.verify` ends."""

    pending: Pending
    peer: str
    #: these credentials verified before: the check goes ahead of unknown ones
    first: bool


class AuthGate:
    """Allowed, denied or pending, for every request but the public paths (on the loop)."""

    def __init__(self, basic_auth: BasicAuth | None, *, nice: Callable[[], None]) -> None:
        self.basic_auth = basic_auth
        #: checks admitted and not yet ended, per source address (unknown ones only)
        self._per_peer: Counter[str] = Counter()
        self._unknown = 0
        self._first_waiting = 0
        #: turns waiting: verified-before credentials in order of arrival, and unknown
        #: ones per source address, the addresses served in turn
        self._first_turns: deque[asyncio.Future[None]] = deque()
        self._unknown_turns: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._busy = False
        #: digests that verified before: they go first (bounded, oldest forgotten)
        self._verified_before: OrderedDict[bytes, None] = OrderedDict()
        self.bcrypt = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="bcrypt", initializer=nice
        )

    def use(self, basic_auth: BasicAuth | None) -> None:
        """A reloaded web config's users: unchanged ones keep their verified credentials."""
        if basic_auth is self.basic_auth:
            return
        if basic_auth is not None and self.basic_auth is not None:
            basic_auth.adopt(self.basic_auth)
        else:
            self._verified_before.clear()  # a new HMAC key: the old digests mean nothing
        self.basic_auth = basic_auth

    def refusal(self, request: Request, *, hung_up: bool) -> Response | None:
        """The error `admit()` would give at once, without side effects; None if none.
        A client that `hung_up` is refused what would need bcrypt."""
        verdict = self._verdict(request)
        if isinstance(verdict, Pending):
            if hung_up:
                return DENIED
            return self._full(request.peer, verdict)
        return None if verdict else DENIED

    def admit(self, request: Request) -> Response | Check | None:
        """None: allowed. A response: denied (401, or 429 when too many checks wait).
        A check: run `verify()` on it, which frees its place."""
        verdict = self._verdict(request)
        if not isinstance(verdict, Pending):
            return None if verdict else DENIED
        full = self._full(request.peer, verdict)
        if full is not None:
            return full
        check = Check(verdict, request.peer, verdict.key in self._verified_before)
        if check.first:
            self._first_waiting += 1
        else:
            self._unknown += 1
            self._per_peer[check.peer] += 1
        return check

    def _verdict(self, request: Request) -> bool | Pending:
        if self.basic_auth is None:
            return True
        return self.basic_auth.verdict(request.headers.get("authorization"))

    def _full(self, peer: str, pending: Pending) -> Response | None:
        if pending.key in self._verified_before:
            return TOO_MANY_CHECKS if self._first_waiting >= MAX_CHECKS else None
        if self._unknown >= MAX_CHECKS or self._per_peer[peer] >= MAX_CHECKS_PER_PEER:
            return TOO_MANY_CHECKS
        return None

    async def verify(self, check: Check, hung_up: Callable[[], bool]) -> bool:
        """Run `check` when its turn comes, unless its client hung up meanwhile."""
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        if check.first:
            self._first_turns.append(turn)
        else:
            self._unknown_turns.setdefault(check.peer, deque()).append(turn)
        try:
            self._next()
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._done()  # it was our turn: pass it on
                raise
            try:
                await asyncio.sleep(0)  # read what has arrived: the client may have hung up
                basic_auth = self.basic_auth  # the web config's now: it may have reloaded
                if hung_up():
                    return False
                if basic_auth is None:
                    return True  # a reloaded web config has no auth any more
                verdict = await loop.run_in_executor(self.bcrypt, basic_auth.verify, check.pending)
                if verdict:
                    self._verified_before[check.pending.key] = None
                    while len(self._verified_before) > REMEMBERED:
                        self._verified_before.popitem(last=False)
                return verdict
            finally:
                self._done()
        finally:
            if check.first:
                self._first_waiting -= 1
            else:
                self._unknown -= 1
                self._per_peer[check.peer] -= 1
                if self._per_peer[check.peer] <= 0:
                    del self._per_peer[check.peer]

    def _done(self) -> None:
        self._busy = False
        self._next()

    def _next(self) -> None:
        """Give the bcrypt thread to the next waiting check: verified-before ones first,
        then one from each source address in turn."""
        if self._busy:
            return
        while self._first_turns or self._unknown_turns:
            if self._first_turns:
                turn = self._first_turns.popleft()
            else:
                peer, turns = next(iter(self._unknown_turns.items()))
                turn = turns.popleft()
                if turns:
                    self._unknown_turns.move_to_end(peer)  # its next one after the others'
                else:
                    del self._unknown_turns[peer]
            if not turn.done():  # not given up (cancelled) while it waited
                self._busy = True
                turn.set_result(None)
                return

    def close(self) -> None:
        """A bcrypt run in progress finishes (bounded by the cost cap); queued ones never start."""
        self.bcrypt.shutdown(wait=False, cancel_futures=True)
