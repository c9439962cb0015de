"""The data the exporter serves: plain immutable values, replaced whole.

The poller builds a new `Snapshot` after every account refresh and swaps it in
with one reference assignment; scrapes read whichever snapshot is current and
so never see a half-written account, and never wait on the poller.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

_EMPTY: Mapping[str, float] = MappingProxyType({})
_NO_PARTS: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class AssetBalance:
    """One asset's record of GET /papi/v1/balance, as binance/models.py parses it."""

    asset: str
    #: API field name (fields.BALANCE) -> value, for the fields present with a value
    values: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    update_time: float | None = None  # epoch seconds


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """GET /papi/v1/account, as binance/models.py parses it."""

    #: API field name (fields.ACCOUNT) -> value, for the fields present with a value
    values: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    status: str | None = None
    update_time: float | None = None  # epoch seconds


@dataclass(frozen=True, slots=True)
class AccountMeta:
    """What the config says about the account for Prometheus to join on (accounts[].labels
    and accounts[].thresholds), each sorted by name."""

    labels: tuple[tuple[str, str], ...] = ()
    thresholds: tuple[tuple[str, float], ...] = ()


NO_META = AccountMeta()


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    name: str
    #: target seconds between two refreshes of this account
    refresh_interval: float
    balances: tuple[AssetBalance, ...] = ()
    info: AccountInfo | None = None
    #: True when the last refresh succeeded
    up: bool = False
    #: a refresh (successful or not) has completed at least once
    attempted: bool = False
    #: started from the state file of a previous run (`--storage.path`)
    restored: bool = False
    last_success: float | None = None  # epoch seconds
    consecutive_failures: int = 0
    #: from the config: set by `SnapshotStore.rebuild` (a reload), kept by `replace`
    meta: AccountMeta = NO_META
    #: the parts of the collectors other than balance and account info, by collector name
    #: (exporter.collectors): each collector reads and writes only its own
    parts: Mapping[str, object] = field(default_factory=lambda: _NO_PARTS)


@dataclass(frozen=True, slots=True)
class Snapshot:
    accounts: Mapping[str, AccountSnapshot]
    #: increases with every replacement, so renderers can cache per generation
    generation: int = 0

    @property
    def pending(self) -> list[str]:
        """Accounts with nothing to show yet: neither refreshed nor restored."""
        return [
            name
            for name, account in self.accounts.items()
            if not (account.attempted or account.restored)
        ]

    @property
    def assets(self) -> frozenset[str]:
        """Every asset held by any account: those the price metrics value."""
        return frozenset(b.asset for a in self.accounts.values() for b in a.balances)


class SnapshotStore:
    """Holds the current snapshot; `replace` swaps in a copy with one account changed,
    `rebuild` one with the set of accounts changed (a config reload). An account's `meta`
    comes from the config: only `rebuild` changes it."""

    def __init__(self, accounts: Iterable[AccountSnapshot]) -> None:
        self._lock = threading.Lock()
        self._current = Snapshot(MappingProxyType({a.name: a for a in accounts}))
        #: called (in the replacing thread) after every change: they must return at once
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` after every change; returns what unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    @property
    def current(self) -> Snapshot:
        return self._current

    def get(self, name: str) -> AccountSnapshot:
        return self._current.accounts[name]

    def replace(self, account: AccountSnapshot) -> Snapshot:
        """Swap in `account`; an account no longer in the store (removed by a reload while
        its refresh was in flight) stays out."""
        with self._lock:
            stored = self._current.accounts.get(account.name)
            if stored is None:
                return self._current
            if account.meta is not stored.meta:  # a refresh begun before a reload
                account = replace(account, meta=stored.meta)
            accounts = dict(self._current.accounts)
            accounts[account.name] = account
            self._current = current = Snapshot(
                MappingProxyType(accounts), self._current.generation + 1
            )
        self._changed()
        return current

    def rebuild(
        self, make: Callable[[Mapping[str, AccountSnapshot]], Iterable[AccountSnapshot]]
    ) -> Snapshot:
        """Swap in the accounts `make` builds from the current ones (sorted by name)."""
        with self._lock:
            accounts = sorted(make(self._current.accounts), key=lambda a: a.name)
            self._current = current = Snapshot(
                MappingProxyType({a.name: a for a in accounts}), self._current.generation + 1
            )
        self._changed()
        return current
