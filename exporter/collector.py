"""Renders the current snapshot as metric families; never talks to Binance.

Every metric's HELP names the API field it comes from. Series of an asset or
account exist only while the snapshot has them, so they vanish with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import fields
from exporter.snapshot import AccountSnapshot, Snapshot, SnapshotStore


def _help(what: str, field: str, endpoint: str) -> str:
    return f"{what} ({field} of {endpoint})."


Sample = tuple[tuple[str, ...], float]


@dataclass(frozen=True, slots=True)
class Family:
    """One gauge family of the snapshot: its name, HELP, labels and one account's samples.

    `samples(account)` gives the label values after `account` and the value of each
    sample; both renderers (prometheus_client's here, the cached one in
    exposition.py) read the families through it, so they cannot disagree.
    """

    name: str
    help: str
    labels: tuple[str, ...]
    samples: Callable[[AccountSnapshot], Iterable[Sample]]
    #: each sample also carries the account's own labels (`AccountSnapshot.meta.labels`)
    own_labels: bool = False

    def label_pairs(
        self, account: AccountSnapshot, values: tuple[str, ...]
    ) -> list[tuple[str, str]]:
        """A sample's labels, name and value, sorted by name as prometheus_client writes them."""
        pairs = [("account", account.name), *zip(self.labels[1:], values, strict=True)]
        if self.own_labels:
            return sorted([*pairs, *account.meta.labels])
        return pairs

    def __post_init__(self) -> None:
        # prometheus_client sorts labels by name; keeping them sorted here keeps the
        # hand-written exposition identical to its output.
        assert self.labels[0] == "account"
        assert list(self.labels) == sorted(self.labels)


def _balance_field(field: str) -> Callable[[AccountSnapshot], Iterable[Sample]]:
    def samples(account: AccountSnapshot) -> Iterable[Sample]:
        for balance in account.balances:
            value = balance.values.get(field)
            if value is not None:
                yield (balance.asset,), value

    return samples


def _balance_time(account: AccountSnapshot) -> Iterable[Sample]:
    for balance in account.balances:
        if balance.update_time is not None:
            yield (balance.asset,), balance.update_time


def _account_field(field: str) -> Callable[[AccountSnapshot], Iterable[Sample]]:
    def samples(account: AccountSnapshot) -> Iterable[Sample]:
        value = None if account.info is None else account.info.values.get(field)
        if value is not None:
            yield (), value

    return samples


def _account_status(account: AccountSnapshot) -> Iterable[Sample]:
    status = None if account.info is None else account.info.status
    if status is None:
        return
    known: tuple[str, ...] = fields.ACCOUNT_STATUSES
    if status not in known:
        known = (*known, status)
    for name in known:
        yield (name,), 1.0 if name == status else 0.0


def _account_time(account: AccountSnapshot) -> Iterable[Sample]:
    if account.info is not None and account.info.update_time is not None:
        yield (), account.info.update_time


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


#: every family the snapshot renders to, in exposition order
FAMILIES: tuple[Family, ...] = (
    *(
        Family(
            f.metric,
            _help(f.help, f.api, fields.BALANCE_ENDPOINT),
            ("account", "asset"),
            _balance_field(f.api),
        )
        for f in fields.BALANCE
    ),
    Family(
        "binance_pm_balance_update_timestamp_seconds",
        _help(
            "When Binance last updated the asset's balance",
            "updateTime / 1000",
            fields.BALANCE_ENDPOINT,
        ),
        ("account", "asset"),
        _balance_time,
    ),
    *(
        Family(
            f.metric,
            _help(f.help, f.api, fields.ACCOUNT_ENDPOINT),
            ("account",),
            _account_field(f.api),
        )
        for f in fields.ACCOUNT
    ),
    Family(
        "binance_pm_account_status",
        _help(
            "1 for the account's current status, 0 for every other known status",
            "accountStatus",
            fields.ACCOUNT_ENDPOINT,
        ),
        ("account", "status"),
        _account_status,
    ),
    Family(
        "binance_pm_account_update_timestamp_seconds",
        _help(
            "When Binance last updated the account", "updateTime / 1000", fields.ACCOUNT_ENDPOINT
        ),
        ("account",),
        _account_time,
    ),
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


class SnapshotCollector(Collector):
    """Account and asset data, and per-account refresh health, from the current snapshot.

    This is the reference rendering through prometheus_client; /metrics serves the
    same families from exposition.CachedExposition, which renders them once per
    snapshot change.
    """

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        yield from snapshot_families(self._store.current)


def snapshot_families(snapshot: Snapshot) -> Iterable[Metric]:
    """The snapshot's families as prometheus_client metric families."""
    for family in FAMILIES:
        metric = GaugeMetricFamily(family.name, family.help, labels=list(family.labels))
        for account in snapshot.accounts.values():
            for labels, value in family.samples(account):
                metric.add_sample(family.name, dict(family.label_pairs(account, labels)), value)
        yield metric
