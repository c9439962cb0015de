"""Event-triggered refreshes: what an event on the stream calls for, which account to
refresh ahead of its round-robin turn, and how much of the weight budget those refreshes
may take.

The user data stream says *when* and *where* to look, and its figures say how urgently;
the poller then reads the account over REST, paid from the same budget B as the
round-robin. `classify` tells danger from routine on the event's own figures and the
account's current snapshot (a pure function):

- RISK, read first: a wallet below zero in the event (`wb`/`cw` of ACCOUNT_UPDATE, `f` of
  outboundAccountPosition) on an asset whose exported negativeBalance is zero (a new
  debt); a change on an asset whose exported negativeBalance is not zero that does not
  show it below zero (its resolution shows as fast as the debt did); a riskLevelChange;
  an ACCOUNT_UPDATE for an insurance clear or an auto-exchange; a liabilityChange that
  raises a liability while the account's uniMMR is below the warning threshold.
- EVENT, everything else that moves balances or risk, a debt already exported that is
  still below zero too: each fill of an account in debt shows it so, and were those
  RISK, a dozen such accounts trading would fill the RISK lane (one 40-weight read per
  3.2 s on the default budget) and a new debt would wait behind them.

and which endpoints it needs: a balance event `balance` alone (20), a risk event
`account` and, when it touches balances or a negative balance, `balance` too; the
round-robin and a CATCHUP read both. Three rules keep a busy stream from starving the
rest:

- Coalescing: one pending refresh per account (the higher priority and the union of the
  endpoints win); at most one triggered refresh of an account per `min_interval`
  seconds, and one RISK refresh per `min_interval` after the last RISK one, so a
  routine refresh never holds a risk one back.
- A share: triggered refreshes spend at most B/2 (a token bucket filling at B/2 per
  budget minute, holding three full refreshes, spent by each refresh's own weight), so
  the round-robin keeps half of B and no account's polled interval grows past twice its
  polling-only interval (the poller serves a round-robin turn before EVENT and CATCHUP
  refreshes once it is a whole interval late).
- An order: RISK oldest first; then EVENT, the account closest to trouble (lowest uniMMR)
  first, then oldest; then CATCHUP oldest first. EVENT and CATCHUP refreshes leave one
  full refresh's worth of tokens in the bucket, so a RISK trigger never waits behind a
  queue of them: it goes at the next slot of the budget.

Plain arithmetic on times passed in: no clock, no I/O, so it is tested on its own.
"""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass

from exporter.binance.events import LIABILITY_CHANGE, RISK_LEVEL_CHANGE, StreamEvent
from exporter.snapshot import AccountSnapshot
from exporter.weights import read_weight


class Priority(enum.IntEnum):
    """Why an account should be refreshed now; lower values go first."""

    #: danger in the event's figures (see `classify`)
    RISK = 0
    #: any other event that moves balances or risk
    EVENT = 1
    #: after a stream (re)connect: events may have been missed
    CATCHUP = 2


BALANCE = frozenset({"balance"})
ACCOUNT = frozenset({"account"})
BOTH = BALANCE | ACCOUNT

#: uniMMR below which the alerts warn (BinancePMUniMMRLow, prometheus/alerts.yml): a
#: liability raised below it is a risk event
UNI_MMR_WARNING = 1.5

#: a CATCHUP for an account whose round-robin turn is this close (or one budget slot,
#: whichever is longer) is dropped: the turn is the catch-up
CATCHUP_NEAR_SECONDS = 5.0
_EPSILON = 1e-6  # weight


@dataclass(frozen=True, slots=True)
class Need:
    """What an event calls for: a refresh of `endpoints`, with `priority`."""

    priority: Priority
    endpoints: frozenset[str]


#: the margin collector that reads a futures book's positions (exporter/collectors/)
BOOK_COLLECTORS = {"UM": "um_account", "CM": "cm_account"}


def books_moved(event: StreamEvent) -> frozenset[str]:
    """The margin collectors an event's position changes call for: an ACCOUNT_UPDATE that
    moved a futures book's positions (`fs` UM or CM, a non-empty `P`) names that book's
    (the poller reads it only when it is enabled)."""
    book = BOOK_COLLECTORS.get(event.positions_of or "")
    return frozenset() if book is None else frozenset({book})


def classify(event: StreamEvent, snapshot: AccountSnapshot | None) -> Need | None:
    """What `event` calls for, given its account's current `snapshot` (None if unknown);
    None for an event that moves nothing the exporter reads."""
    if not event.moves_account:
        return None
    if event.kind == RISK_LEVEL_CHANGE:
        return Need(Priority.RISK, ACCOUNT)
    debts = _negative_assets(snapshot) if snapshot is not None else set()
    # a wallet below zero that the snapshot does not show as a debt yet
    new_debt = not debts.issuperset(event.below_zero)
    # a debt's asset moved and is not shown below zero: the debt may be paid
    resolving = not debts.intersection(event.assets).issubset(event.below_zero)
    if event.is_risk or new_debt or resolving:
        return Need(Priority.RISK, BOTH)
    if event.kind == LIABILITY_CHANGE and _raises_liability(event, snapshot):
        uni_mmr = uni_mmr_of(snapshot)
        if uni_mmr is not None and uni_mmr < warning_threshold(snapshot):
            return Need(Priority.RISK, BOTH)
    if event.moves_balances:
        return Need(Priority.EVENT, BALANCE)
    return Need(Priority.EVENT, ACCOUNT)  # openOrderLoss: an account figure


def warning_threshold(snapshot: AccountSnapshot | None) -> float:
    """The uniMMR below which `BinancePMUniMMRLow` warns for the account: its own
    `accounts[].thresholds.uni_mmr_warning`, else the alerts' default."""
    if snapshot is None:
        return UNI_MMR_WARNING
    return dict(snapshot.meta.thresholds).get("uni_mmr_warning", UNI_MMR_WARNING)


def uni_mmr_of(snapshot: AccountSnapshot | None) -> float | None:
    """The account's uniMMR as last known (polled or from a riskLevelChange)."""
    if snapshot is None or snapshot.info is None:
        return None
    return snapshot.info.values.get("uniMMR")


def _negative_assets(snapshot: AccountSnapshot) -> set[str]:
    return {b.asset for b in snapshot.balances if b.values.get("negativeBalance")}


def _raises_liability(event: StreamEvent, snapshot: AccountSnapshot | None) -> bool:
    """Whether the liabilityChange's total `l` is above what the snapshot holds for the
    asset (borrowed plus interest); when either is unknown, it may be: yes."""
    if event.liability is None or snapshot is None or not event.assets:
        return True
    for balance in snapshot.balances:
        if balance.asset == event.assets[0]:
            values = balance.values
            if "crossMarginBorrowed" not in values:
                return True
            held = values["crossMarginBorrowed"] + values.get("crossMarginInterest", 0.0)
            return event.liability > held
    return True


@dataclass(slots=True)
class _Pending:
    priority: Priority
    #: arrival order of the first trigger of this priority, for oldest-first
    seq: int
    endpoints: frozenset[str]
    #: the account's uniMMR when last triggered (inf when unknown): EVENTs go lowest first
    uni_mmr: float

    def key(self) -> tuple[int, float, int]:
        urgency = self.uni_mmr if self.priority is Priority.EVENT else 0.0
        return (self.priority, urgency, self.seq)


class TriggerQueue:
    """Pending triggered refreshes of the accounts of one egress, and their weight share.

    `weight` is one full refresh's weight (w: what the round-robin reads), `rate` the
    whole budget in weight per second (B over the budget's minute), `min_interval` the
    per-account coalescing interval.
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
        self._last_risk: dict[str, float] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._pending)

    def add(
        self,
        name: str,
        priority: Priority,
        endpoints: frozenset[str] = BOTH,
        uni_mmr: float | None = None,
    ) -> bool:
        """Note a trigger for `name` to read `endpoints`, coalesced with any pending one
        (the higher priority and the union of endpoints win); False when it changed
        nothing. `uni_mmr` is the account's, to order EVENTs by."""
        urgency = math.inf if uni_mmr is None else uni_mmr
        pending = self._pending.get(name)
        if pending is None:
            self._pending[name] = _Pending(priority, next(self._seq), endpoints, urgency)
            return True
        pending.uni_mmr = urgency
        changed = False
        if priority < pending.priority:
            pending.priority, pending.seq = priority, next(self._seq)
            changed = True
        if not endpoints <= pending.endpoints:
            pending.endpoints |= endpoints
            changed = True
        return changed

    def names(self) -> set[str]:
        """The accounts with a trigger pending."""
        return set(self._pending)

    def discard(self, name: str) -> None:
        """A full refresh of `name` starts: it answers every trigger that arrived before it."""
        self._pending.pop(name, None)

    def pending(self, name: str) -> Priority | None:
        entry = self._pending.get(name)
        return None if entry is None else entry.priority

    def endpoints(self, name: str) -> frozenset[str]:
        """What the pending trigger of `name` reads (nothing if none is pending)."""
        entry = self._pending.get(name)
        return frozenset() if entry is None else entry.endpoints

    def next(self, now: float, busy: set[str]) -> tuple[str | None, float]:
        """The account whose triggered refresh may start at `now` (None if none), and,
        when none may, the time at which one could (inf: none pending or all `busy`)."""
        self._fill(now)
        best: tuple[tuple[int, float, int], str] | None = None
        later = float("inf")
        for name, entry in self._pending.items():
            if name in busy:
                continue  # in flight: the one more follows once it completes
            last = self._last_risk if entry.priority is Priority.RISK else self._last_start
            ready = last.get(name, -float("inf")) + self.min_interval
            if ready > now:
                later = min(later, ready)
            elif best is None or entry.key() < best[0]:
                best = (entry.key(), name)
        if best is None:
            return None, later
        entry = self._pending[best[1]]
        need = self._need(entry)
        if self._tokens < need - _EPSILON:  # (rounding must not stall the caller)
            return None, min(later, now + max((need - self._tokens) / self._rate, 1e-3))
        return best[1], now

    def start(self, name: str, now: float) -> frozenset[str]:
        """`name`'s triggered refresh starts at `now`: spend its tokens; what it reads."""
        self._fill(now)
        entry = self._pending.pop(name, None)
        endpoints = BOTH if entry is None else entry.endpoints
        self._tokens -= read_weight(endpoints) if endpoints else self.weight
        self._last_start[name] = now
        if entry is not None and entry.priority is Priority.RISK:
            self._last_risk[name] = now
        return endpoints

    def _need(self, entry: _Pending) -> float:
        """Tokens in the bucket for `entry` to go: all but RISK leave one full refresh's
        worth behind them."""
        own = read_weight(entry.endpoints)
        return own if entry.priority is Priority.RISK else own + self.weight

    def _fill(self, now: float) -> None:
        if self._filled_at is not None and now > self._filled_at:
            self._tokens = min(self._capacity, self._tokens + (now - self._filled_at) * self._rate)
        if self._filled_at is None or now > self._filled_at:
            self._filled_at = now
