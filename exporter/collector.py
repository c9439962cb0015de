"""Renders the current snapshot as metric families; never talks to Binance.

Every metric's HELP names the API field it comes from. Series of an asset or
account exist only while the snapshot has them, so they vanish with it.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.binance.models import ACCOUNT_STATUSES
from exporter.snapshot import Snapshot, SnapshotStore

_BALANCE = "GET /papi/v1/balance"
_ACCOUNT = "GET /papi/v1/account"

#: (metric name, API field, what it is) for each amount of a balance record
BALANCE_METRICS = (
    (
        "binance_pm_wallet_balance",
        "totalWalletBalance",
        "Wallet balance: cross margin free + locked + UM wallet + CM wallet",
    ),
    (
        "binance_pm_cross_margin_asset",
        "crossMarginAsset",
        "Cross margin asset: cross margin free + locked",
    ),
    ("binance_pm_cross_margin_borrowed", "crossMarginBorrowed", "Cross margin borrowed principal"),
    ("binance_pm_cross_margin_free", "crossMarginFree", "Cross margin free asset"),
    ("binance_pm_cross_margin_interest", "crossMarginInterest", "Cross margin interest"),
    ("binance_pm_cross_margin_locked", "crossMarginLocked", "Cross margin locked asset"),
    ("binance_pm_um_wallet_balance", "umWalletBalance", "USD-M futures wallet balance"),
    ("binance_pm_um_unrealized_pnl", "umUnrealizedPNL", "USD-M futures unrealized profit"),
    ("binance_pm_cm_wallet_balance", "cmWalletBalance", "COIN-M futures wallet balance"),
    ("binance_pm_cm_unrealized_pnl", "cmUnrealizedPNL", "COIN-M futures unrealized profit"),
    (
        "binance_pm_negative_balance",
        "negativeBalance",
        "Negative balance amount, as Binance reports it (0 when none; any other value, "
        "whatever its sign, is a negative balance)",
    ),
)

#: (metric name, API field, what it is) for each amount of the account record
ACCOUNT_METRICS = (
    (
        "binance_pm_uni_mmr",
        "uniMMR",
        "Unified maintenance margin ratio (lower is riskier; liquidation near 1.05)",
    ),
    ("binance_pm_account_equity_usd", "accountEquity", "Account equity in USD"),
    (
        "binance_pm_actual_equity_usd",
        "actualEquity",
        "Actual equity in USD (without collateral rate)",
    ),
    ("binance_pm_initial_margin_usd", "accountInitialMargin", "Initial margin in USD"),
    ("binance_pm_maint_margin_usd", "accountMaintMargin", "Maintenance margin in USD"),
    (
        "binance_pm_total_available_balance_usd",
        "totalAvailableBalance",
        "Total available balance in USD",
    ),
    (
        "binance_pm_total_margin_open_loss_usd",
        "totalMarginOpenLoss",
        "Total margin open loss in USD",
    ),
    (
        "binance_pm_virtual_max_withdraw_amount_usd",
        "virtualMaxWithdrawAmount",
        "Virtual maximum withdrawal amount in USD",
    ),
)


def _help(what: str, field: str, endpoint: str) -> str:
    return f"{what} ({field} of {endpoint})."


class SnapshotCollector(Collector):
    """Account and asset data, and per-account refresh health, from the current snapshot."""

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        snapshot = self._store.current  # one read: the whole scrape sees one snapshot
        yield from balance_families(snapshot)
        yield from account_families(snapshot)
        yield from health_families(snapshot)


def balance_families(snapshot: Snapshot) -> Iterable[Metric]:
    families = [
        (GaugeMetricFamily(name, _help(what, field, _BALANCE), labels=["account", "asset"]), field)
        for name, field, what in BALANCE_METRICS
    ]
    updated = GaugeMetricFamily(
        "binance_pm_balance_update_timestamp_seconds",
        _help("When Binance last updated the asset's balance", "updateTime / 1000", _BALANCE),
        labels=["account", "asset"],
    )
    for account in snapshot.accounts.values():
        for balance in account.balances:
            labels = [account.name, balance.asset]
            for family, field in families:
                value = balance.values.get(field)
                if value is not None:
                    family.add_metric(labels, value)
            if balance.update_time is not None:
                updated.add_metric(labels, balance.update_time)
    yield from (family for family, _ in families)
    yield updated


def account_families(snapshot: Snapshot) -> Iterable[Metric]:
    families = [
        (GaugeMetricFamily(name, _help(what, field, _ACCOUNT), labels=["account"]), field)
        for name, field, what in ACCOUNT_METRICS
    ]
    status = GaugeMetricFamily(
        "binance_pm_account_status",
        _help(
            "1 for the account's current status, 0 for every other known status",
            "accountStatus",
            _ACCOUNT,
        ),
        labels=["account", "status"],
    )
    updated = GaugeMetricFamily(
        "binance_pm_account_update_timestamp_seconds",
        _help("When Binance last updated the account", "updateTime / 1000", _ACCOUNT),
        labels=["account"],
    )
    for account in snapshot.accounts.values():
        info = account.info
        if info is None:
            continue
        for family, field in families:
            value = info.values.get(field)
            if value is not None:
                family.add_metric([account.name], value)
        if info.status is not None:
            known = (
                ACCOUNT_STATUSES
                if info.status in ACCOUNT_STATUSES
                else (*ACCOUNT_STATUSES, info.status)
            )
            for name in known:
                status.add_metric([account.name, name], 1.0 if name == info.status else 0.0)
        if info.update_time is not None:
            updated.add_metric([account.name], info.update_time)
    yield from (family for family, _ in families)
    yield status
    yield updated


def health_families(snapshot: Snapshot) -> Iterable[Metric]:
    up = GaugeMetricFamily(
        "binance_pm_up",
        "1 when the account's last refresh succeeded, else 0.",
        labels=["account"],
    )
    last_success = GaugeMetricFamily(
        "binance_pm_last_success_timestamp_seconds",
        "When the account was last refreshed successfully.",
        labels=["account"],
    )
    failures = GaugeMetricFamily(
        "binance_pm_account_consecutive_failures",
        "Refreshes of the account that failed in a row since its last success.",
        labels=["account"],
    )
    interval = GaugeMetricFamily(
        "binance_pm_refresh_interval_seconds",
        "Target seconds between two refreshes of the account: "
        "max(accounts x weight / budget, min_interval_seconds).",
        labels=["account"],
    )
    for account in snapshot.accounts.values():
        up.add_metric([account.name], 1.0 if account.up else 0.0)
        if account.last_success is not None:
            last_success.add_metric([account.name], account.last_success)
        failures.add_metric([account.name], account.consecutive_failures)
        interval.add_metric([account.name], account.refresh_interval)
    yield from (up, last_success, failures, interval)
