"""Event-triggered refreshes: which account to refresh ahead of its round-robin turn, and
how much of the weight budget those refreshes may take.

The user data stream says *when* and *where* to look; the poller then refreshes that
account over REST, paid from the same budget B as the round-robin. Three rules keep a
busy stream from starving the rest:

- Coalescing: at most one triggered refresh per account per `min_interval` seconds, and
  triggers that arrive while the account's refresh is in flight make one more after it.
- A share: triggered refreshes spend at most B/2 (a token bucket filling at B/2 per
  budget minute, holding up to three refreshes), so the round-robin keeps half of B and
  no account's polled interval grows past twice its polling-only interval (the poller
  also serves a round-robin turn first once it is a whole interval late, which bounds
  the bucket's bursts too).
- An order: RISK, then EVENT, then CATCHUP, oldest first within one priority. EVENT and
  CATCHUP refreshes leave one refresh's worth of tokens in the bucket, so a RISK trigger
  never waits behind a queue of them: it goes at the next slot of the budget.

Plain arithmetic on times passed in: no clock, no I/O, so it is tested on its own.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass


class Priority(enum.IntEnum):
    """Why an account should be refreshed now; lower values go first."""

    #: riskLevelChange; ACCOUNT_UPDATE with reason INSURANCE_CLEAR or AUTO_EXCHANGE
    RISK = 0
    #: any other event that moves balances or risk
    EVENT = 1
    #: after a stream (re)connect: events may have been missed
    CATCHUP = 2


#: a CATCHUP for an account whose round-robin turn is this close (or one budget slot,
#: whichever is longer) is dropped: the turn is the catch-up
CATCHUP_NEAR_SECONDS = 5.0
_EPSILON = 1e-6  # weight


@dataclass(slots=True)
class _Pending:
    priority: Priority
    #: arrival order of the first trigger of this priority, for oldest-first
    seq: int


class TriggerQueue:
    """Pending triggered refreshes of the accounts of one egress, and their weight share.

    `weight` is one refresh's weight (w), `rate` the whole budget in weight per second
    (B over the budget's minute), `min_interval` the per-account coalescing interval.
    """

    def __init__(self, weight: int, rate: float, min_interval: float) -> None:
        self.weight = weight
        self.min_interval = min_interval
        #: what the queue was made for: (weight, rate, min_interval)
        self.plan = (weight, rate, min_interval)
        self._rate = rate / 2  # the triggered share: half of B
        # Three refreshes: tokens that come while a refresh waits for its slot are kept
        # (with two, a third of the share was lost to that wait), one is left for RISK.
        self._capacity = 3.0 * weight
        self._tokens = self._capacity
        self._filled_at: float | None = None
        self._pending: dict[str, _Pending] = {}
        self._last_start: dict[str, float] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, name: str, priority: Priority) -> bool:
        """Note a trigger for `name`, coalesced with any pending one (the higher priority
        wins); False when it changed nothing."""
        pending = self._pending.get(name)
        if pending is None:
            self._pending[name] = _Pending(priority, next(self._seq))
        elif priority < pending.priority:
            pending.priority, pending.seq = priority, next(self._seq)
        else:
            return False
        return True

    def names(self) -> set[str]:
        """The accounts with a trigger pending."""
        return set(self._pending)

    def discard(self, name: str) -> None:
        """A refresh of `name` starts: it answers every trigger that arrived before it."""
        self._pending.pop(name, None)

    def pending(self, name: str) -> Priority | None:
        entry = self._pending.get(name)
        return None if entry is None else entry.priority

    def next(self, now: float, busy: set[str]) -> tuple[str | None, float]:
        """The account whose triggered refresh may start at `now` (None if none), and,
        when none may, the time at which one could (inf: none pending or all `busy`)."""
        self._fill(now)
        best: tuple[int, int, str] | None = None
        later = float("inf")
        for name, entry in self._pending.items():
            if name in busy:
                continue  # in flight: the one more follows once it completes
            ready = self._last_start.get(name, -float("inf")) + self.min_interval
            if ready > now:
                later = min(later, ready)
            elif best is None or (entry.priority, entry.seq) < best[:2]:
                best = (entry.priority, entry.seq, name)
        if best is None:
            return None, later
        need = self._need(Priority(best[0]))
        if self._tokens < need - _EPSILON:  # (rounding must not stall the caller)
            return None, min(later, now + max((need - self._tokens) / self._rate, 1e-3))
        return best[2], now

    def start(self, name: str, now: float) -> None:
        """`name`'s triggered refresh starts at `now`: spend its tokens."""
        self._fill(now)
        self._tokens -= self.weight
        self._last_start[name] = now
        self.discard(name)

    def _need(self, priority: Priority) -> float:
        """Tokens in the bucket for a refresh of `priority` to go: all but RISK leave one
        refresh's worth behind them."""
        return self.weight if priority is Priority.RISK else 2.0 * self.weight

    def _fill(self, now: float) -> None:
        if self._filled_at is not None and now > self._filled_at:
            self._tokens = min(self._capacity, self._tokens + (now - self._filled_at) * self._rate)
        if self._filled_at is None or now > self._filled_at:
            self._filled_at = now
