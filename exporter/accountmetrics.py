"""What the config says about each account, for Prometheus to join on: its own labels and
its alert thresholds.

``binance_pm_account_info{account, <labels>} 1`` carries ``accounts[].labels`` once per
account (every account has one, with no labels of its own too, so that a join never drops
an account), instead of adding them to every series; the alert rules copy them with a
``group_left``. ``binance_pm_account_threshold{account, threshold}`` is each threshold an
account sets; the rules use it where it exists and their global default elsewhere.
Both are read from the running config at scrape time: a reload changes them at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.config import AccountConfig

INFO = "binance_pm_account_info"
THRESHOLD = "binance_pm_account_threshold"


class AccountConfigCollector(Collector):
    """The info and threshold series of the accounts this replica polls."""

    def __init__(self, accounts: Callable[[], Sequence[AccountConfig]]) -> None:
        self._accounts = accounts  # the current accounts: a reload adds and removes some

    def collect(self) -> Iterable[Metric]:
        info = Metric(
            INFO,
            "The account's own labels from the config (accounts[].labels); always 1. "
            "Join on account to carry them to other series.",
            "gauge",
        )
        threshold = GaugeMetricFamily(
            THRESHOLD,
            "The account's own alert threshold from the config (accounts[].thresholds), by "
            "name; where absent, the alert rules use their default.",
            labels=["account", "threshold"],
        )
        for account in sorted(self._accounts(), key=lambda a: a.name):
            info.add_sample(INFO, {**account.labels, "account": account.name}, 1.0)
            for name, value in account.thresholds.given().items():
                threshold.add_metric([account.name, name], value)
        yield info
        yield threshold
