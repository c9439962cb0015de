"""Renders the current snapshot as metric families; never talks to Binance.

Every metric's HELP names the API field it comes from. Series of an asset or
account exist only while the snapshot has them, so they vanish with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.collectors import registry
from exporter.families import Family, Sample
from exporter.snapshot import AccountSnapshot, Snapshot, SnapshotStore

__all__ = ["DEFAULT_FAMILIES", "FAMILIES", "HEALTH", "Family", "SnapshotCollector", "families_of"]


def _up(account: AccountSnapshot) -> Iterable[Sample]:
    yield (), 1.0 if account.up else 0.0


def _last_success(account: AccountSnapshot) -> Iterable[Sample]:
    if account.last_success is not None:
        yield (), account.last_success


def _failures(account: AccountSnapshot) -> Iterable[Sample]:
    yield (), float(account.consecutive_failures)


def _interval(account: AccountSnapshot) -> Iterable[Sample]:
    yield (), account.refresh_interval


def _info(account: AccountSnapshot) -> Iterable[Sample]:
    yield (), 1.0  # every account, labels of its own or not: a join never drops one


def _thresholds(account: AccountSnapshot) -> Iterable[Sample]:
    for name, value in account.meta.thresholds:
        yield (name,), value


#: the families of every account's refresh health and config, after the collectors'
HEALTH: tuple[Family, ...] = (
    Family(
        "binance_pm_up",
        "1 when the account's last refresh succeeded, else 0.",
        ("account",),
        _up,
    ),
    Family(
        "binance_pm_last_success_timestamp_seconds",
        "When the account was last refreshed successfully.",
        ("account",),
        _last_success,
    ),
    Family(
        "binance_pm_account_consecutive_failures",
        "Refreshes of the account that failed in a row since its last success.",
        ("account",),
        _failures,
    ),
    Family(
        "binance_pm_refresh_interval_seconds",
        "Target seconds between two refreshes of the account: "
        "max(accounts x weight / budget, min_interval_seconds).",
        ("account",),
        _interval,
    ),
    Family(
        "binance_pm_account_info",
        "The account's own labels from the config (accounts[].labels); always 1. The alert "
        "rules join on account to carry them.",
        ("account",),
        _info,
        own_labels=True,
    ),
    Family(
        "binance_pm_account_threshold",
        "The account's own alert thresholds from the config (accounts[].thresholds), by "
        "name; where absent, the alert rules use their defaults.",
        ("account", "threshold"),
        _thresholds,
    ),
)


def families_of(collectors: Iterable[registry.Collector[Any]]) -> tuple[Family, ...]:
    """Every family the snapshot renders to with `collectors` enabled, in exposition order."""
    return (*registry.families(collectors), *HEALTH)


#: the families with the collectors enabled by default
DEFAULT_FAMILIES = families_of(registry.enabled({}))
#: every family any registered collector can render (the README's metric table)
FAMILIES = families_of(registry.registered())


class SnapshotCollector(Collector):
    """Account and asset data, and per-account refresh health, from the current snapshot.

    This is the reference rendering through prometheus_client; /metrics serves the
    same families from exposition.CachedExposition, which renders them once per
    snapshot change.
    """

    def __init__(self, store: SnapshotStore, families: Sequence[Family] | None = None) -> None:
        self._store = store
        self._families = DEFAULT_FAMILIES if families is None else tuple(families)

    def collect(self) -> Iterable[Metric]:
        yield from snapshot_families(self._store.current, self._families)


def snapshot_families(
    snapshot: Snapshot, families: Sequence[Family] = DEFAULT_FAMILIES
) -> Iterable[Metric]:
    """The snapshot's families as prometheus_client metric families."""
    for family in families:
        metric = GaugeMetricFamily(family.name, family.help, labels=list(family.labels))
        for account in snapshot.accounts.values():
            for labels, value in family.samples(account):
                metric.add_sample(family.name, dict(family.label_pairs(account, labels)), value)
        yield metric
