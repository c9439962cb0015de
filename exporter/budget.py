"""The request-weight budget of one egress IP, and the pauses that IP is under.

Binance counts weight per IP and minute, for every client on that IP together.
The exporter may spend `limit * share` per minute. Requests are paced evenly
(a reservation of `w` weight moves the earliest next start by `w / rate`), and a
sliding log guarantees that no 60 s window ever holds more than the budget, even
with the network's jitter between our clock and Binance's. When a response
shows the IP near its limit, or Binance answers 429, 418 or 403 (its firewall),
every request on the IP waits until the pause ends.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

WINDOW_SECONDS = 60.0
#: the budget is spent over a little more than Binance's minute, to absorb
#: network jitter between the time we send and the time Binance counts
GUARD_SECONDS = WINDOW_SECONDS + 0.5
#: after a minute boundary, wait this much more before the first request
BOUNDARY_MARGIN_SECONDS = 0.5
DEFAULT_BAN_SECONDS = 120.0
#: Binance bans last 2 minutes to 3 days; a longer end (a garbled message or header)
#: must not silence the exporter for years
MAX_PAUSE_SECONDS = 3 * 86400.0

Sleep = Callable[[float], Awaitable[None]]


class BudgetFigures(Protocol):
    """The budget's settings as the config holds them (`BudgetSettings`)."""

    @property
    def ip_weight_limit_per_minute(self) -> int: ...
    @property
    def share(self) -> float: ...
    @property
    def ip_high_water(self) -> float: ...


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    limit_per_minute: int
    share: float
    high_water: float

    @property
    def per_minute(self) -> float:
        return self.limit_per_minute * self.share


def shard_limits(settings: BudgetFigures, shards: int = 1) -> BudgetLimits:
    """The limits of one of `shards` replicas polling from the same egress IPs.

    Each spends its part, B / shards per minute (B = limit x share), so the IP sees B
    whatever the number of shards, and refresh intervals stay N·w/B.
    """
    return BudgetLimits(
        settings.ip_weight_limit_per_minute, settings.share / shards, settings.ip_high_water
    )


@dataclass(frozen=True)
class BudgetState:
    """One budget's state at one moment, as plain values (`WeightBudget.figures`)."""

    egress: str
    last_used_weight: int | None
    spent_total: int
    per_minute: float
    limit_per_minute: int
    #: epoch seconds until which requests are paused; 0 when not paused
    paused_until: float
    #: pauses so far, by reason
    pauses: dict[str, int]


class WeightBudget:
    """Pacing, the 60 s guard and the pause state of one egress; read by the metrics."""

    def __init__(
        self,
        egress: str,
        settings: BudgetLimits,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.egress = egress
        self.settings = settings
        self._clock = clock
        self._sleep = sleep
        self._rate = settings.per_minute / GUARD_SECONDS  # weight per second
        self._next_start = -math.inf  # earliest time the next reservation may start
        self._log: deque[tuple[float, int]] = deque()  # (time, weight) within the guard
        self._logged = 0
        #: epoch seconds until which no request may be sent (0: not paused)
        self.paused_until = 0.0
        self.pause_reason = ""
        self.pauses: Counter[str] = Counter()
        self.spent_total = 0
        self.last_used_weight: int | None = None

    def figures(self) -> BudgetState:
        """Its state now, as plain values: what the self-metrics read at scrape time."""
        now = self.now()
        return BudgetState(
            egress=self.egress,
            last_used_weight=self.last_used_weight,
            spent_total=self.spent_total,
            per_minute=self.settings.per_minute,
            limit_per_minute=self.settings.limit_per_minute,
            paused_until=self.paused_until if self.is_paused(now) else 0.0,
            pauses=dict(self.pauses),
        )

    def set_limits(self, settings: BudgetLimits) -> None:
        """New limits (a config reload). The spending log stays: the next requests wait until
        the last 60 s hold room under the new budget, so a change never makes a burst."""
        self.settings = settings
        self._rate = settings.per_minute / GUARD_SECONDS

    # --- spending -----------------------------------------------------------

    def delay(self, weight: int, now: float) -> float:
        """Seconds to wait before `weight` may be spent at `now` (0: go)."""
        self._expire(now)
        wait = max(self.paused_until - now, self._next_start - now, 0.0)
        if self._logged + weight > self.settings.per_minute and self._log:
            # Wait until enough of the oldest reservations leave the guard window.
            excess = self._logged + weight - self.settings.per_minute
            for when, spent in self._log:
                excess -= spent
                if excess <= 0:
                    wait = max(wait, when + GUARD_SECONDS - now)
                    break
        return wait

    def reserve(self, weight: int, now: float) -> None:
        """Record `weight` as spent at `now`; call only when `delay()` said 0."""
        self._next_start = max(self._next_start, now) + weight / self._rate
        self._log.append((now, weight))
        self._logged += weight

    async def acquire(self, weight: int) -> None:
        """Wait until `weight` may be spent, then reserve it."""
        if weight > self.settings.per_minute:
            raise ValueError(f"a request of weight {weight} exceeds the whole budget")
        while (wait := self.delay(weight, self._clock())) > 0:
            await self._sleep(wait)
        self.reserve(weight, self._clock())

    async def wait_unpaused(self) -> None:
        """Wait while requests are paused; for requests whose weight is already reserved."""
        while (wait := self.paused_until - self._clock()) > 0:
            await self._sleep(wait)

    def _expire(self, now: float) -> None:
        while self._log and self._log[0][0] <= now - GUARD_SECONDS:
            self._logged -= self._log.popleft()[1]

    # --- what Binance tells us ---------------------------------------------

    def count_sent(self, weight: int) -> None:
        self.spent_total += weight

    def note_used_weight(self, used: int | None, now: float, clock_offset: float) -> None:
        """Pause until the next minute when the IP (all clients) is at or above high water."""
        if used is None:
            return
        self.last_used_weight = used
        if used >= self.settings.high_water * self.settings.limit_per_minute:
            self.pause(next_minute(now, clock_offset), "high_water")

    def rate_limited(
        self,
        retry_after: float | None,
        now: float,
        clock_offset: float,
        reason: str = "rate_limited",
    ) -> None:
        """HTTP 429, or 403 from the WAF (`reason` "waf_blocked"): until Retry-After, else
        the next minute boundary."""
        until = now + retry_after if retry_after is not None else next_minute(now, clock_offset)
        self.pause(min(until, now + MAX_PAUSE_SECONDS), reason)

    def banned(
        self,
        retry_after: float | None,
        banned_until: float | None,
        now: float,
        clock_offset: float,
    ) -> None:
        """HTTP 418: until Retry-After, else the ban's end in the message while it is
        ahead, else 2 minutes (a 418 is a ban now, whatever end its message names)."""
        if retry_after is not None:
            until = now + retry_after
        elif banned_until is not None and banned_until - clock_offset > now:
            until = banned_until - clock_offset + BOUNDARY_MARGIN_SECONDS
        else:
            until = now + DEFAULT_BAN_SECONDS
        self.pause(min(until, now + MAX_PAUSE_SECONDS), "banned")

    def pause(self, until: float, reason: str) -> None:
        if until > self.paused_until:
            if self.paused_until <= self._clock() or reason != self.pause_reason:
                self.pauses[reason] += 1
            self.paused_until = until
            self.pause_reason = reason

    def now(self) -> float:
        return self._clock()

    def is_paused(self, now: float) -> bool:
        return now < self.paused_until


def next_minute(now: float, clock_offset: float) -> float:
    """The local time of the next minute boundary of the server's clock, plus a margin."""
    server_now = now + clock_offset
    boundary = (math.floor(server_now / WINDOW_SECONDS) + 1) * WINDOW_SECONDS
    return boundary - clock_offset + BOUNDARY_MARGIN_SECONDS


def refresh_interval(accounts: int, weight: int, settings: BudgetLimits, floor: float) -> float:
    """Seconds between two refreshes of one account: max(N·w/B minutes, min_interval).

    The budget's minute is the guard window, a little over 60 s, so that pacing and the
    guard agree and the guard never has to hold back a refresh in steady state.
    """
    return max(accounts * weight / settings.per_minute * GUARD_SECONDS, floor)
