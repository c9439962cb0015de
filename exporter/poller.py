"""The refresh loop: every account of one egress IP, round-robin, within its weight budget.

Each account is refreshed every `max(N·w/B, min_interval)` seconds, the starts
spread evenly from the first second: a refresh makes the request of every enabled
collector (exporter.collectors) in turn, each the same way (`_collect`), w being the sum
of their weights. A refresh that fails backs off that
account alone (exponentially, capped; auth errors straight to the cap). After
every refresh the account's new state is swapped into the snapshot store.

An event on the account's user data stream can `trigger` a refresh ahead of its
turn (coalesced, prioritised, within half of the budget: `exporter.triggers`), of only
the endpoints (collectors) the event moved; the round-robin reads them all, so under
a storm of events an account's interval grows to at most twice the above. A triggered
read answers every event of its account whose time E is at or before the moment its
request was signed (server time, less the clock's uncertainty), or at or before the
time of an event that had arrived by then (that change was on the server when the
request left): the second event of one change costs nothing. A riskLevelChange goes
into the snapshot at once (`apply_risk`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from types import MappingProxyType
from typing import Any, TypeVar

import structlog

from exporter.binance import errors
from exporter.binance.client import BinanceClient, Credentials, RequestReport
from exporter.budget import GUARD_SECONDS, WeightBudget
from exporter.clock import finish_within
from exporter.clocksync import ClockSync
from exporter.collectors.registry import Collector, Scope, Skipped, refresh_weight
from exporter.egress import EgressLedger
from exporter.selfmetrics import Instruments, StreamHealth
from exporter.snapshot import AccountInfo, AccountSnapshot, SnapshotStore
from exporter.throttle import LogThrottle
from exporter.triggers import (
    ACCOUNT,
    BOTH,
    CATCHUP_NEAR_SECONDS,
    Priority,
    TriggerQueue,
    uni_mmr_of,
)

BACKOFF_CAP_SECONDS = 300.0
#: the backoff's exponent stops here: interval x 2**64 is past any cap, and a larger
#: exponent (failure 1,025 overflows a float; a restored 2**62 would hang) is never computed
_BACKOFF_MAX_EXPONENT = 64
#: a round-robin turn served up to this much after it was due (the event loop busy with
#: other work: a flood of scrapes, a slow parse) keeps its account's even cadence; later than
#: this and than a budget slot, its interval counts from when it is served (see `_start`).
#: Without it a loop a few ms late on every turn moved each account's cadence by as much,
#: turn after turn (bench/load.py under wrk: lateness p99 0.47 s, gaps p50 5.013 s)
ON_TIME_SECONDS = 0.5
#: an event time E further ahead of the server's clock than this is not used for ordering
FUTURE_EVENT_SECONDS = 86400.0
T = TypeVar("T")
log = structlog.get_logger("exporter.poller")


@dataclass(frozen=True, repr=False)
class Target:
    """One account to poll: its name (the `account` label) and its credentials."""

    name: str
    credentials: Credentials

    def __repr__(self) -> str:
        return f"Target({self.name!r})"


@dataclass(frozen=True)
class PollSettings:
    allows_asset: Callable[[str], bool]
    #: seconds between two refreshes of one account
    interval: float
    #: the enabled collectors (exporter.collectors.enabled), read in this order: a
    #: round-robin turn reads them all, a triggered refresh those its events moved
    collectors: tuple[Collector[Any], ...]
    #: the longest a failing account waits before its next try (auth errors wait this long)
    backoff_cap: float = BACKOFF_CAP_SECONDS
    #: at most one event-triggered refresh of an account per this many seconds
    trigger_interval: float = 2.0
    #: the config's collect switches, by name (each collector's `narrow` reads them)
    switches: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def weight(self) -> int:
        """w: one round-robin turn's weight, the sum of the collectors' request weights."""
        return refresh_weight(self.collectors)

    @property
    def scope(self) -> Scope:
        """What the config lets each collector's part hold."""
        return Scope(self.switches, self.allows_asset)


@dataclass
class _Account:
    target: Target
    next_due: float = 0.0
    in_flight: bool = False
    #: what the last failure was, to log only changes of state
    failure: str | None = None
    #: the last riskLevelChange applied to the snapshot
    risk: _Risk | None = None
    #: the endpoints the refresh in flight reads -> the time (server clock, epoch
    #: seconds) up to which its answer is known to hold every change: see `_answers_up_to`;
    #: None until its request is signed
    reading: dict[str, float | None] = field(default_factory=dict)
    #: endpoint -> the same for the last successful read of it
    signed: dict[str, float] = field(default_factory=dict)
    #: the latest event time E that arrived on the account's stream (epoch seconds)
    latest_event: float | None = None


@dataclass(frozen=True)
class _Risk:
    """A riskLevelChange's figures, as AccountInfo values (API field names)."""

    values: Mapping[str, float]
    status: str | None
    time: float  # the event's time, epoch seconds
    applied: float  # when it went into the snapshot, on the poller's clock

    def over(self, info: AccountInfo | None) -> AccountInfo:
        if info is None:
            return AccountInfo(values=self.values, status=self.status)
        values = MappingProxyType({**info.values, **self.values})
        return replace(info, values=values, status=self.status or info.status)


def backoff(
    interval: float, failures: int, error: BaseException, cap: float = BACKOFF_CAP_SECONDS
) -> float:
    """Seconds until a failing account's next try."""
    cap = max(cap, interval)
    if isinstance(error, errors.AuthError):
        return cap
    if isinstance(error, errors.BinanceError) and not error.account_fault:
        return interval  # the IP is paused; the account itself is fine
    exponent = min(max(failures - 1, 0), _BACKOFF_MAX_EXPONENT)
    return min(interval * 2.0**exponent, cap)


class EgressPoller:
    """Polls the accounts that share one egress IP, and so one budget and one client."""

    def __init__(
        self,
        *,
        targets: Iterable[Target],
        make_client: Callable[..., BinanceClient],  # called with observer=
        budget: WeightBudget,
        store: SnapshotStore,
        instruments: Instruments,
        settings: PollSettings,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        stream: StreamHealth | None = None,
        clock_sync: ClockSync | None = None,
    ) -> None:
        self._accounts = [_Account(t) for t in targets]
        self._by_name = {a.target.name: a for a in self._accounts}
        self._ledger = EgressLedger(budget, instruments)
        self._instruments = instruments
        #: malformed records: one line per account per minute, with the count held back
        self._records_log = LogThrottle(clock=clock)
        self._future_log = LogThrottle(clock=clock)
        self._client = make_client(observer=self._observe)
        self._budget = budget
        self._store = store
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        self._tasks: set[asyncio.Task[None]] = set()
        self._stream = stream
        self._triggers = self._plan_triggers()
        self._wake = asyncio.Event()
        #: sets the client's clock offset from Binance's time endpoints (other hosts)
        self._clock_sync = clock_sync or ClockSync.same_host(budget, instruments, sleep=sleep)
        #: the server clock's uncertainty, seconds: half the round trip of the last sync
        self._clock_error = 0.0

    @property
    def client(self) -> BinanceClient:
        return self._client

    @property
    def settings(self) -> PollSettings:
        return self._settings

    @property
    def targets(self) -> list[Target]:
        return [a.target for a in self._accounts]

    async def run(self) -> None:
        """Schedule refreshes until cancelled; in-flight refreshes are left to `drain`."""
        await self._sync_time()
        interval = self._settings.interval
        start = self._clock()
        for index, account in enumerate(self._accounts):
            account.next_due = start + index * interval / len(self._accounts)
        while True:
            self._wake.clear()  # a trigger or a finished refresh from now on wakes the nap
            now = self._clock()
            chosen, endpoints, triggered, wake_at = self._next_refresh(now)
            if chosen is None:
                await self._nap(wake_at - now)
                continue
            weight = sum(self._weights[endpoint] for endpoint in endpoints)
            # The slot is chosen when it comes: a trigger arriving meanwhile may take it.
            if (wait := self._budget.delay(weight, now)) > 0:
                await self._nap(wait)
                continue
            self._budget.reserve(weight, now)
            self._start(chosen, endpoints, triggered, now)

    def trigger(
        self,
        name: str,
        priority: Priority,
        endpoints: frozenset[str] = BOTH,
        event_time: float | None = None,
    ) -> None:
        """Read `endpoints` of account `name` ahead of its round-robin turn (an event on
        its stream, of time `event_time` in epoch seconds when it has one).

        An endpoint whose read in flight, or last read, answers the event is left out
        (`_answered`); the rest is coalesced per account, ordered by priority, paid from
        at most half of the budget (see `exporter.triggers`). Unknown names are ignored.
        Like `apply_risk`, call it from the event loop the poller runs in."""
        account = self._by_name.get(name)
        if account is None or self._store.get(name).consecutive_failures:
            return  # a failing account keeps its backoff: its next turn will tell
        wanted = endpoints & self._full  # what is enabled: account info, collectors
        wanted = frozenset(e for e in wanted if not self._answered(account, e, event_time))
        if event_time is not None and (account.latest_event or 0.0) < event_time:
            account.latest_event = event_time
        if not wanted:
            return
        if (
            priority is Priority.CATCHUP
            and not account.in_flight
            and self._triggers.pending(name) is None
            and account.next_due - self._clock() <= self._catchup_near
        ):
            return  # its round-robin turn is the catch-up
        uni_mmr = uni_mmr_of(self._store.get(name))
        if self._triggers.add(name, priority, wanted, uni_mmr):
            self._wake.set()

    def _answered(self, account: _Account, endpoint: str, event_time: float | None) -> bool:
        """Whether a read of `endpoint` in flight or done answers an event of `event_time`:
        one not yet signed does (it is sent after the event came, so the server answers
        it after the change), one signed does when event_time is at or before the time
        it answers up to (`_answers_up_to`). An event without a time is answered only by
        a read not yet signed."""
        if endpoint in account.reading:
            up_to = account.reading[endpoint]
            if up_to is None:
                return True
        else:
            up_to = account.signed.get(endpoint)
        return up_to is not None and event_time is not None and event_time <= up_to

    def _answers_up_to(self, account: _Account) -> float:
        """For a request of `account` signed now: the time up to which every change is in
        its answer. The server clock now, less its uncertainty (half the round trip of
        the last time sync); and no earlier than the latest event already arrived (that
        change was on the server before the request left, and so was every earlier one:
        the two events of one change share their time)."""
        signed = self._client.server_now() - self._clock_error
        return max(signed, account.latest_event or signed)

    def snapshot_of(self, name: str) -> AccountSnapshot | None:
        """Account `name`'s current snapshot, if it is polled here."""
        return self._store.current.accounts.get(name) if name in self._by_name else None

    def apply_risk(
        self,
        name: str,
        *,
        uni_mmr: float | None,
        equity: float | None,
        actual_equity: float | None,
        maint_margin: float | None,
        status: str | None,
        event_time: float,
    ) -> None:
        """Put a riskLevelChange into the snapshot at once; the refresh it triggers then
        reconciles. An event older than the last one applied is ignored."""
        account = self._by_name.get(name)
        if account is None or not self._full >= ACCOUNT:
            return  # without account info polled, nothing would ever reconcile it
        if event_time > self._client.server_now() + FUTURE_EVENT_SECONDS:
            # E = 999999999999999 would make every later event look old: it goes in, but
            # keeps the last event's place in the order
            event_time = account.risk.time if account.risk is not None else float("-inf")
            if self._stream is not None:
                self._stream.future_event(name)
            if (held_back := self._future_log.allow(name)) is not None:
                log.warning("stream_event_in_future", account=name, lines_held_back=held_back)
        if account.risk is not None and event_time < account.risk.time:
            return
        values = {
            field: value
            for field, value in (
                ("uniMMR", uni_mmr),
                ("accountEquity", equity),
                ("actualEquity", actual_equity),
                ("accountMaintMargin", maint_margin),
            )
            if value is not None
        }
        account.risk = _Risk(MappingProxyType(values), status, event_time, self._clock())
        snapshot = self._store.get(name)
        self._store.replace(replace(snapshot, info=account.risk.over(snapshot.info)))

    def _next_refresh(self, now: float) -> tuple[_Account | None, frozenset[str], bool, float]:
        """The account to refresh at `now`, the endpoints to read (its turn: all; a
        trigger: those its events moved) and whether by trigger; else None, and when to
        look again.

        Triggers first, within their share; but a round-robin turn already a whole
        interval late goes before EVENT and CATCHUP ones, so no polled interval passes 2x
        (a RISK one goes first still: it is bounded by the share and its own interval)."""
        interval = self._settings.interval
        busy = set()
        due: _Account | None = None
        for account in self._accounts:
            if account.in_flight:
                busy.add(account.target.name)
                if account.next_due <= now and account.reading.keys() >= self._full:
                    account.next_due += interval  # slower than its interval: skip this turn
            elif due is None or account.next_due < due.next_due:
                due = account  # (an account reading one endpoint keeps its turn for later)
        late = due is not None and due.next_due <= now - interval + self._slot
        name, trigger_at = self._triggers.next(now, busy)
        if name is not None and (not late or self._triggers.pending(name) is Priority.RISK):
            # (& _full: a reload may have turned off a collector a pending trigger names)
            return self._by_name[name], self._triggers.endpoints(name) & self._full, True, now
        if due is not None and due.next_due <= now:
            return due, self._full, False, now
        due_at = float("inf") if due is None else due.next_due
        return None, frozenset(), False, min(due_at, trigger_at)

    def _start(
        self, account: _Account, endpoints: frozenset[str], triggered: bool, now: float
    ) -> None:
        interval = self._settings.interval
        name = account.target.name
        if triggered:
            endpoints = self._triggers.start(name, now)
            if endpoints >= self._full:  # read it all: its turn moves one interval on
                account.next_due = now + interval
            if self._stream is not None:
                self._stream.triggered_refresh(name, endpoints)
        else:
            self._triggers.discard(name)  # this turn answers the triggers so far
            # On time (within a slot, or ON_TIME_SECONDS), the turns keep their even
            # spacing; a turn served late, behind the triggered reads' half of B, counts
            # its interval from now, so the round-robin asks for no more than it gets and
            # never starves them.
            on_time = now - account.next_due <= max(self._slot, ON_TIME_SECONDS)
            account.next_due = account.next_due + interval if on_time else now + interval
        account.in_flight = True
        account.reading = dict.fromkeys(endpoints)
        task = asyncio.create_task(self._refresh(account, endpoints), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _nap(self, seconds: float) -> None:
        """Sleep `seconds` (on the injected clock), or less if a trigger comes in."""
        if seconds == float("inf"):
            await self._wake.wait()
            return
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    def update(self, targets: Iterable[Target], settings: PollSettings) -> None:
        """Take a reloaded config's accounts for this egress, and their settings.

        An account given the same `Target` keeps its schedule and backoff; a new one, or one
        with a new `Target` (new credentials), is due at once (the budget paces it); a removed
        one is no longer scheduled, and a refresh of it in flight just ends. Never called
        with no targets.
        """
        kept = {a.target.name: a for a in self._accounts}
        now = self._clock()
        accounts = []
        for target in targets:
            account = kept.get(target.name) or _Account(target, next_due=now)
            if account.target is not target:
                account.target, account.next_due = target, now
            accounts.append(account)
        self._accounts = accounts
        self._by_name = {a.target.name: a for a in accounts}
        self._settings = settings
        for name in self._triggers.names() - self._by_name.keys():
            self._triggers.discard(name)
        self._triggers = self._plan_triggers(self._triggers)
        self._wake.set()  # new accounts are due now

    def _plan_triggers(self, current: TriggerQueue | None = None) -> TriggerQueue:
        """The trigger queue for the current settings and budget: `current` (its pending
        triggers and share) while those have not changed, else a new one."""
        rate = self._budget.settings.per_minute / GUARD_SECONDS
        weight, interval = self._settings.weight, self._settings.trigger_interval
        #: seconds between two refreshes when the budget is fully used
        self._slot = weight / rate
        #: what the round-robin reads: every enabled collector, by name (the endpoints of
        #: exporter.triggers: "balance", "account", ...)
        self._full = frozenset(c.name for c in self._settings.collectors)
        self._weights = {c.name: c.request.weight for c in self._settings.collectors}
        self._catchup_near = max(CATCHUP_NEAR_SECONDS, self._slot)
        if current is not None and current.plan == (weight, rate, interval):
            return current
        return TriggerQueue(weight, rate, interval)

    async def drain(self, grace: float) -> None:
        """Let in-flight refreshes finish within `grace` seconds (on the clock), cancel
        the rest, close."""
        await finish_within(self._tasks, grace, self._sleep)
        await self._client.aclose()

    async def _sync_time(self) -> None:
        before = self._clock()
        # logs; a failure keeps the offset (and its uncertainty)
        if await self._clock_sync.sync(self._client) is not None:
            # at most half the sync's round trip (more when it fell back to a second host)
            self._clock_error = max(0.0, self._clock() - before) / 2

    async def _refresh(self, account: _Account, endpoints: frozenset[str]) -> None:
        # Runs as a task of its own, so the bound account reaches only its own log lines.
        structlog.contextvars.bind_contextvars(account=account.target.name)
        started = self._clock()
        name = account.target.name
        previous = self._store.current.accounts.get(name)
        if previous is None:  # a reload removed the account since it was scheduled
            account.in_flight = False
            account.reading = {}
            return
        current = previous
        try:
            for collector in self._settings.collectors:
                if collector.name in endpoints:
                    current = await self._collect(collector, account, previous, current)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the one broad boundary: one account's refresh
            failures = previous.consecutive_failures + 1
            current = replace(current, up=False, attempted=True, consecutive_failures=failures)
            settings = self._settings
            account.next_due = started + backoff(
                settings.interval, failures, exc, settings.backoff_cap
            )
            self.note_pause(exc)
            self._log_failure(account, exc, failures, self._clock() - started)
        else:
            current = replace(
                current, up=True, attempted=True, last_success=self._clock(), consecutive_failures=0
            )
            if account.failure is not None:
                failures = previous.consecutive_failures
                log.info("poll_recovered", after_failures=failures)
                account.failure = None
            log.debug("refreshed", seconds=round(self._clock() - started, 3))
            for endpoint, signed in account.reading.items():
                if signed is not None:
                    account.signed[endpoint] = max(signed, account.signed.get(endpoint, signed))
        finally:
            account.in_flight = False
            read_at = account.reading.get("account")
            account.reading = {}
            if (
                account.risk is not None
                and account.risk.applied > started
                and (read_at is None or account.risk.time > read_at)
            ):
                # A riskLevelChange this read did not answer came in meanwhile: keep it
                # until the refresh it triggered.
                current = replace(current, info=account.risk.over(current.info))
            if current.refresh_interval != self._settings.interval:  # a reload came meanwhile
                current = replace(current, refresh_interval=self._settings.interval)
            self._store.replace(current)
            self._wake.set()  # a trigger that came in meanwhile may go now

    async def _collect(
        self,
        collector: Collector[Any],
        account: _Account,
        previous: AccountSnapshot,
        current: AccountSnapshot,
    ) -> AccountSnapshot:
        """One enabled collector's request; its answer merged into the part `previous`
        held (`merge`), narrowed to the config's scope and put into `current`."""
        request = collector.request
        fetch = partial(
            self._client.read,
            request.path,
            collector.name,
            collector.parse,
            params=request.params,
            weight=request.weight,
        )
        parsed = await self._call(fetch, collector.name, account, request.weight)
        self._note_skipped(collector.name, previous.name, collector.skipped(parsed))
        part = collector.merge(collector.get(previous), parsed)
        return collector.put(current, collector.narrow(part, self._settings.scope))

    async def _call(
        self,
        fetch: Callable[[Credentials], Awaitable[T]],
        endpoint: str,
        account: _Account,
        weight: int,
    ) -> T:
        """One request to `endpoint`; after a -1021, resync the clock and try once more."""
        # The refresh reserved its weight before its first request; a pause that began
        # since (a 429 or 418 on another account) holds its later requests too.
        await self._budget.wait_unpaused()
        try:
            account.reading[endpoint] = self._answers_up_to(account)  # the client signs now
            return await fetch(account.target.credentials)
        except errors.TimestampError:
            log.info("timestamp_rejected")
            await self._sync_time()
            await self._budget.acquire(weight)
            account.reading[endpoint] = self._answers_up_to(account)
            return await fetch(account.target.credentials)

    def _note_skipped(self, source: str, name: str, skipped: Skipped) -> None:
        """Count the records of `source`'s answer its parser skipped; log them, a line per
        account per minute."""
        for reason, count in skipped.counts.items():
            self._instruments.dropped.labels(source, reason).inc(count)
        if skipped.problems and (held_back := self._records_log.allow(name)) is not None:
            log.warning(
                "malformed_records",
                account=name,
                source=source,
                problems=list(skipped.problems),
                dropped=dict(skipped.counts),
                lines_held_back=held_back,
            )

    def _observe(self, report: RequestReport) -> None:
        """Called by the client for every request: metrics and the IP's used weight."""
        self._ledger.observe(report, self._client.clock_offset)

    def note_pause(self, exc: BaseException) -> None:
        """Pause the route after a 429, 418 or firewall 403 (any request of its, the
        stream's listenKey calls included); other errors change nothing."""
        self._ledger.note_error(exc, self._client.clock_offset)

    def _log_failure(
        self, account: _Account, exc: BaseException, failures: int, seconds: float
    ) -> None:
        if isinstance(exc, errors.BinanceError):
            endpoint, outcome, error = exc.endpoint, exc.outcome, str(exc)
        else:  # a bug of ours: its type, never a message that might quote data
            endpoint, outcome, error = "", "crashed", type(exc).__name__
        state = f"{outcome}:{getattr(exc, 'code', '')}"
        event = {
            "endpoint": endpoint,
            "outcome": outcome,
            "seconds": round(seconds, 3),
            "error": error,
            "failures": failures,
            # next_due may already be past (a long request, a pause): never a negative wait
            "retry_in": round(max(0.0, account.next_due - self._clock()), 1),
        }
        if state != account.failure:
            account.failure = state
            log.warning("poll_failed", **event)
        else:
            log.debug("poll_failed", **event)
