"""What a collector is, and the registry of them: one module per Binance endpoint.

A `Collector` declares in one place its request (path, weight, parameters), its parser
into our own snapshot types, how an answer joins the last part (`merge`, `skipped`), what
the config lets its part hold (`narrow`), where its part lives in the `AccountSnapshot`,
its metric families, its config switch (`collect.<name>`) and default, and how its part
is stored under `--storage.path` (`encode`, `decode`, `times`). The poller reads the
enabled collectors, the weight arithmetic sums their weights, storage writes and reads
their parts through `encode`/`decode`, and the scrape path renders their families from
the snapshot: none of them names a collector.

Registering is one call, `register(collector)`; the built-in collectors register when
`exporter.collectors` is imported. A leaf: the snapshot and families types only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from exporter.families import Family
from exporter.snapshot import AccountSnapshot

P = TypeVar("P")

_NO_COUNTS: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Scope:
    """What the config lets a part hold: its `collect.<name>` switches (e.g.
    `collect.positions: false`) and the asset filter (`collect.assets`)."""

    switches: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))
    allows_asset: Callable[[str], bool] = lambda asset: True


@dataclass(frozen=True, slots=True)
class Skipped:
    """Records of one answer its parser skipped, the rest being usable: counted by reason
    (binance_pm_dropped_records_total) and logged, a line each (the first few)."""

    counts: Mapping[str, int] = field(default_factory=lambda: _NO_COUNTS)
    problems: tuple[str, ...] = ()


NOTHING_SKIPPED = Skipped()


@dataclass(frozen=True, slots=True)
class Request:
    """One signed GET of the PM API."""

    path: str
    #: request weight, per Binance's docs
    weight: int
    #: query parameters sent before recvWindow and timestamp
    params: tuple[tuple[str, str], ...] = ()

    @property
    def endpoint(self) -> str:
        return f"GET {self.path}"


def _same(part: P, scope: Scope) -> P:
    return part


def _answer(previous: Any, parsed: Any) -> Any:
    return parsed


def _nothing_skipped(parsed: Any) -> Skipped:
    return NOTHING_SKIPPED


def _no_times(part: Any) -> Iterable[float | None]:
    return ()


@dataclass(frozen=True, slots=True)
class Collector(Generic[P]):
    """One endpoint, from request to /metrics and the state file."""

    #: the requests' `endpoint` label, the storage key, the config switch `collect.<name>`
    name: str
    request: Request
    #: the answer's JSON into our part (or into what `merge` makes the part of); raises
    #: exporter.binance.errors.InvalidResponse when none of it can be used
    parse: Callable[[object], Any]
    families: tuple[Family, ...]
    #: polled when the config does not say (`collect.<name>`)
    default: bool
    #: the part in an account's snapshot (None: none yet)
    get: Callable[[AccountSnapshot], P | None]
    #: the account's snapshot with `part` in place (None: removed)
    put: Callable[[AccountSnapshot, P | None], AccountSnapshot]
    #: the part as JSON values for the state file, and back (`decode` raises ValueError or
    #: TypeError, `exporter.collectors.stored.Unusable` to name a reason)
    encode: Callable[[P], object]
    decode: Callable[[object], P]
    #: the part as the config's scope wants it (switches, asset filter): the same object
    #: when it changes nothing (its rendered lines stay cached)
    narrow: Callable[[P, Scope], P] = _same
    #: the new part from the last one (None: none yet) and what `parse` gave: by default
    #: the parsed answer itself (balance keeps the last values of a skipped record)
    merge: Callable[[P | None, Any], P] = _answer
    #: the records `parse` skipped (by default none): counted and logged by the poller
    skipped: Callable[[Any], Skipped] = _nothing_skipped
    #: the times (epoch seconds) a part holds: a restored part with one before 1970 or
    #: in the future is not used
    times: Callable[[P], Iterable[float | None]] = _no_times
    #: the config switch when it is not `collect.<name>`
    switch: str | None = None
    #: the account record's own key in the state file (balance: "balances", account:
    #: "info", the format's first shape); None: under `parts.<name>`
    stored_as: str | None = None

    @property
    def setting(self) -> str:
        """The config switch that turns it on: `collect.<setting>`."""
        return self.switch or self.name


def in_parts(
    name: str,
) -> tuple[Callable[[AccountSnapshot], Any], Callable[[AccountSnapshot, Any], AccountSnapshot]]:
    """`get` and `put` for a part kept in `AccountSnapshot.parts` under `name`."""

    def get(account: AccountSnapshot) -> Any:
        return account.parts.get(name)

    def put(account: AccountSnapshot, part: Any) -> AccountSnapshot:
        parts = {k: v for k, v in account.parts.items() if k != name}
        if part is not None:
            parts[name] = part
        return replace(account, parts=MappingProxyType(parts))

    return get, put


_REGISTERED: dict[str, Collector[Any]] = {}


def register(collector: Collector[P]) -> Collector[P]:
    """Add `collector` to the registry (its name must be new); returns it."""
    if collector.name in _REGISTERED:
        raise ValueError(f"a collector named {collector.name!r} is already registered")
    _REGISTERED[collector.name] = collector
    return collector


def unregister(name: str) -> None:
    """Remove a registered collector (tests that register one of their own)."""
    _REGISTERED.pop(name, None)


def registered() -> tuple[Collector[Any], ...]:
    """Every registered collector, in registration order."""
    return tuple(_REGISTERED.values())


def enabled(switches: Mapping[str, bool]) -> tuple[Collector[Any], ...]:
    """The collectors `switches` (the config's `collect.<name>`) turn on, else by default."""
    return tuple(c for c in registered() if switches.get(c.setting, c.default))


def refresh_weight(collectors: Iterable[Collector[Any]]) -> int:
    """w: the weight of one account refresh, the sum of its collectors' request weights."""
    return sum(c.request.weight for c in collectors)


def families(collectors: Iterable[Collector[Any]]) -> tuple[Family, ...]:
    """The families of `collectors`, in their order."""
    return tuple(f for c in collectors for f in c.families)
