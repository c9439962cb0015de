"""The refresh loop: every account of one egress IP, round-robin, within its weight budget.

Each account is refreshed every `max(N·w/B, min_interval)` seconds, the starts
spread evenly from the first second. A refresh that fails backs off that
account alone (exponentially, capped; auth errors straight to the cap). After
every refresh the account's new state is swapped into the snapshot store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

import structlog

from exporter.binance import errors
from exporter.binance.client import BinanceClient, Credentials, RequestReport
from exporter.binance.models import AccountInfo, AssetBalance, ParsedBalances
from exporter.budget import WeightBudget
from exporter.selfmetrics import Instruments
from exporter.snapshot import AccountSnapshot, SnapshotStore
from exporter.weights import WEIGHTS, refresh_weight

BACKOFF_CAP_SECONDS = 300.0
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
    account_info: bool
    allows_asset: Callable[[str], bool]
    #: seconds between two refreshes of one account
    interval: float

    @property
    def weight(self) -> int:
        return refresh_weight(self.account_info)


@dataclass
class _Account:
    target: Target
    next_due: float = 0.0
    in_flight: bool = False
    #: what the last failure was, to log only changes of state
    failure: str | None = None


def backoff(interval: float, failures: int, error: BaseException) -> float:
    """Seconds until a failing account's next try."""
    cap = max(BACKOFF_CAP_SECONDS, interval)
    if isinstance(error, errors.AuthError):
        return cap
    if isinstance(error, errors.BinanceError) and not error.account_fault:
        return interval  # the IP is paused; the account itself is fine
    return float(min(interval * 2 ** max(failures - 1, 0), cap))


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
    ) -> None:
        self._accounts = [_Account(t) for t in targets]
        self._client = make_client(observer=self._observe)
        self._budget = budget
        self._store = store
        self._instruments = instruments
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> BinanceClient:
        return self._client

    @property
    def settings(self) -> PollSettings:
        return self._settings

    async def run(self) -> None:
        """Schedule refreshes until cancelled; in-flight refreshes are left to `drain`."""
        await self._sync_time()
        interval = self._settings.interval
        start = self._clock()
        for index, account in enumerate(self._accounts):
            account.next_due = start + index * interval / len(self._accounts)
        while True:
            interval = self._settings.interval  # `update` may have changed it
            account = min(self._accounts, key=lambda a: a.next_due)
            wait = account.next_due - self._clock()
            if wait > 0:
                await self._sleep(wait)
                continue
            if account.in_flight:  # slower than its interval: skip this turn
                account.next_due += interval
                continue
            await self._budget.acquire(self._settings.weight)
            account.next_due = max(account.next_due + interval, self._clock())
            account.in_flight = True
            task = asyncio.create_task(self._refresh(account), name=account.target.name)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

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
        self._settings = settings

    async def drain(self, grace: float) -> None:
        """Let in-flight refreshes finish within `grace` seconds, cancel the rest, close."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._client.aclose()

    async def _sync_time(self) -> None:
        try:
            await self._budget.acquire(WEIGHTS["time"])
            offset = await self._client.sync_time()
        except errors.BinanceError as exc:
            self._note_pause(exc)
            log.warning("time_sync_failed", egress=self._budget.egress, error=str(exc))
        else:
            log.info("time_synced", egress=self._budget.egress, offset_ms=round(offset * 1000))

    async def _refresh(self, account: _Account) -> None:
        # Runs as a task of its own, so the bound account reaches only its own log lines.
        structlog.contextvars.bind_contextvars(account=account.target.name)
        started = self._clock()
        name = account.target.name
        previous = self._store.current.accounts.get(name)
        if previous is None:  # a reload removed the account since it was scheduled
            account.in_flight = False
            return
        current = previous
        try:
            balances = await self._call(self._client.balance, "balance", account)
            current = replace(current, balances=self._merge(previous, balances))
            if self._settings.account_info:
                info: AccountInfo = await self._call(self._client.account, "account", account)
                current = replace(current, info=info)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the one broad boundary: one account's refresh
            failures = previous.consecutive_failures + 1
            current = replace(current, up=False, attempted=True, consecutive_failures=failures)
            account.next_due = started + backoff(self._settings.interval, failures, exc)
            self._note_pause(exc)
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
        finally:
            account.in_flight = False
            self._store.replace(current)

    async def _call(
        self, fetch: Callable[[Credentials], Awaitable[T]], endpoint: str, account: _Account
    ) -> T:
        """One request to `endpoint`; after a -1021, resync the clock and try once more."""
        # The refresh reserved its weight before its first request; a pause that began
        # since (a 429 or 418 on another account) holds its later requests too.
        await self._budget.wait_unpaused()
        try:
            return await fetch(account.target.credentials)
        except errors.TimestampError:
            log.info("timestamp_rejected")
            await self._budget.acquire(WEIGHTS["time"])
            await self._client.sync_time()
            await self._budget.acquire(WEIGHTS[endpoint])
            return await fetch(account.target.credentials)

    def _merge(self, previous: AccountSnapshot, parsed: ParsedBalances) -> tuple[AssetBalance, ...]:
        """The new balances, filtered; a skipped malformed record keeps its asset's last values."""
        if parsed.problems:
            log.warning("malformed_records", account=previous.name, problems=list(parsed.problems))
        kept = [b for b in previous.balances if b.asset in parsed.skipped_assets]
        allowed = self._settings.allows_asset
        return tuple(
            sorted(
                (b for b in (*parsed.balances, *kept) if allowed(b.asset)), key=lambda b: b.asset
            )
        )

    def _observe(self, report: RequestReport) -> None:
        """Called by the client for every request: metrics and the IP's used weight."""
        log.debug(
            "request",
            endpoint=report.endpoint,
            outcome=report.outcome,
            seconds=round(report.duration, 4),
            used_weight=report.used_weight,
        )
        self._instruments.requests.labels(report.endpoint, report.outcome).inc()
        self._instruments.duration.labels(report.endpoint).observe(report.duration)
        if report.sent:  # a reset mid-response spent its weight too; a refused connect did not
            self._budget.count_sent(WEIGHTS[report.endpoint])
        was_paused = self._budget.paused_until
        self._budget.note_used_weight(report.used_weight, self._clock(), self._client.clock_offset)
        if self._budget.paused_until != was_paused:
            self._log_pause()

    def _note_pause(self, exc: BaseException) -> None:
        now, offset = self._clock(), self._client.clock_offset
        if isinstance(exc, errors.IpBanned):
            self._budget.banned(exc.retry_after, exc.banned_until, now, offset)
        elif isinstance(exc, errors.RateLimited):  # a 429, or a 403 of the WAF
            self._budget.rate_limited(exc.retry_after, now, offset, reason=exc.outcome)
        else:
            return
        self._log_pause()

    def _log_pause(self) -> None:
        log.warning(
            "requests_paused",
            egress=self._budget.egress,
            reason=self._budget.pause_reason,
            until=round(self._budget.paused_until, 3),
            used_weight=self._budget.last_used_weight,
        )

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
            "retry_in": round(account.next_due - self._clock(), 1),
        }
        if state != account.failure:
            account.failure = state
            log.warning("poll_failed", **event)
        else:
            log.debug("poll_failed", **event)
