"""The exporter's own health metrics: requests, latency, weight and pauses.

These are live: counters and a histogram updated by the poller, and gauges read
from the budgets at scrape time. The account data comes from the snapshot
collector instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.budget import WeightBudget

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Instruments:
    """Counters the poller updates for every request it makes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "binance_pm_requests",
            "Requests to the Binance PM API, by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "binance_pm_request_duration_seconds",
            "Time from sending a request to the Binance PM API to its complete response.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class BudgetCollector(Collector):
    """Weight and pause state of each egress IP's budget, read at scrape time."""

    def __init__(self, budgets: Callable[[], Sequence[WeightBudget]]) -> None:
        self._budgets = budgets  # the current budgets: a reload adds and removes egresses

    def collect(self) -> Iterable[Metric]:
        used = GaugeMetricFamily(
            "binance_pm_ip_used_weight",
            "Request weight used by the whole egress IP in the current minute, as Binance "
            "last reported it (X-MBX-USED-WEIGHT-1M header).",
            labels=["egress"],
        )
        spent = CounterMetricFamily(
            "binance_pm_weight_spent",
            "Request weight this exporter has spent on the egress IP.",
            labels=["egress"],
        )
        budget = GaugeMetricFamily(
            "binance_pm_weight_budget_per_minute",
            "Request weight per minute this exporter may spend on the egress IP "
            "(budget.ip_weight_limit_per_minute x budget.share).",
            labels=["egress"],
        )
        limit = GaugeMetricFamily(
            "binance_pm_ip_weight_limit_per_minute",
            "Binance's request-weight limit per minute for the whole egress IP "
            "(budget.ip_weight_limit_per_minute).",
            labels=["egress"],
        )
        paused = GaugeMetricFamily(
            "binance_pm_paused_until_timestamp_seconds",
            "Until when all requests on the egress IP are paused (high water, 429, 418 or 403); "
            "0 when not paused.",
            labels=["egress"],
        )
        pauses = CounterMetricFamily(
            "binance_pm_pauses",
            "Pauses of all requests on the egress IP, by reason "
            "(high_water, rate_limited, banned, waf_blocked).",
            labels=["egress", "reason"],
        )
        for b in self._budgets():
            if b.last_used_weight is not None:
                used.add_metric([b.egress], b.last_used_weight)
            spent.add_metric([b.egress], b.spent_total)
            budget.add_metric([b.egress], b.settings.per_minute)
            limit.add_metric([b.egress], b.settings.limit_per_minute)
            paused.add_metric([b.egress], b.paused_until if b.is_paused(b.now()) else 0.0)
            for reason in ("high_water", "rate_limited", "banned", "waf_blocked"):
                pauses.add_metric([b.egress, reason], b.pauses[reason])
        yield from (used, spent, budget, limit, paused, pauses)


class BuildInfoCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "binance_pm_exporter_build_info",
            "The exporter's version; always 1.",
            labels=["version"],
        )
        info.add_metric([__version__], 1)
        yield info


@dataclass
class ReloadStatus:
    """How the last config reload went; the start counts as a successful load."""

    successful: bool
    #: when the running config was loaded (epoch seconds)
    last_success: float


class ReloadCollector(Collector):
    """Prometheus's own names for the same thing (prometheus_config_last_reload_*)."""

    def __init__(self, status: ReloadStatus) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "binance_pm_config_last_reload_successful",
            "1 when the last config reload succeeded (or none was tried); 0 when it failed "
            "and the previous config still runs.",
            value=1.0 if self._status.successful else 0.0,
        )
        yield GaugeMetricFamily(
            "binance_pm_config_last_reload_success_timestamp_seconds",
            "When the running config was loaded: at start, or by the last successful reload.",
            value=self._status.last_success,
        )
