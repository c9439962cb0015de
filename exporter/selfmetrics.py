"""The exporter's own health metrics: requests, latency, weight and pauses.

These are live: counters and a histogram updated by the poller, and gauges read
from the budgets at scrape time. The account data comes from the snapshot
collector instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from exporter import __version__

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Live(Collector):
    """prometheus_client metrics of ours (`_metrics`), collected without their `_created`
    series, which would double the health metrics for no use; prometheus_client's switch
    for that (`disable_created_metrics`) is global to the process, so it is left alone."""

    _metrics: tuple[MetricWrapperBase, ...] = ()

    def describe(self) -> Iterable[Metric]:
        return [family for metric in self._metrics for family in metric.describe()]

    def collect(self) -> Iterable[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                created = family.name + "_created"
                family.samples = [s for s in family.samples if s.name != created]
                yield family


class Instruments(_Live):
    """Counters the poller updates for every request it makes, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "binance_pm_requests",
            "Requests to Binance (the PM API; ticker_price: the spot API's prices), "
            "by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=None,
        )
        self.duration = Histogram(
            "binance_pm_request_duration_seconds",
            "Time from sending a request to Binance to its complete response.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.dropped = Counter(
            "binance_pm_dropped_records",
            "Records from outside dropped on the way in, by source (a collector, e.g. "
            "balance: a balance answer's asset; state_file: an account of the state file) "
            "and reason (malformed, label: a name that cannot be a label value, duplicate, "
            "over_cap, out_of_range).",
            ["source", "reason"],
            registry=None,
        )
        self._metrics = (self.requests, self.duration, self.dropped)
        registry.register(self)


#: the event types counted by name in binance_pm_stream_events_total; any other is
#: counted as "other", so a stream cannot make up label values
STREAM_EVENTS = frozenset(
    {
        "ACCOUNT_UPDATE",
        "balanceUpdate",
        "liabilityChange",
        "listenKeyExpired",
        "openOrderLoss",
        "outboundAccountPosition",
        "riskLevelChange",
    }
)


#: the endpoints a triggered refresh reads (the `endpoint` label of its counter)
TRIGGERED_ENDPOINTS = ("balance", "account")


class StreamHealth(_Live):
    """The user data streams' own health, one series per account; the stream client
    calls these methods, the poller `triggered_refresh`. A collector to register."""

    def __init__(self, accounts: Iterable[str]) -> None:
        self.up = Gauge(
            "binance_pm_stream_up",
            "1 while the account's user data stream is connected, else 0.",
            ["account"],
            registry=None,
        )
        self.last_event = Gauge(
            "binance_pm_stream_last_event_timestamp_seconds",
            "Event time (E) of the last event received on the account's user data stream.",
            ["account"],
            registry=None,
        )
        self.events = Counter(
            "binance_pm_stream_events",
            "Events received on the account's user data stream, by event type "
            '("other" for types the exporter does not use).',
            ["account", "event"],
            registry=None,
        )
        self.reconnects = Counter(
            "binance_pm_stream_reconnects",
            "Reconnections of the account's user data stream, by the reason of the drop.",
            ["account", "reason"],
            registry=None,
        )
        self.triggered = Counter(
            "binance_pm_stream_triggered_refreshes",
            "Reads of the account started ahead of its turn by events on its stream, by "
            "the endpoint read (a refresh reading balance and account counts under both).",
            ["account", "endpoint"],
            registry=None,
        )
        self.rejected = Counter(
            "binance_pm_stream_frames_rejected",
            "Frames of the account's user data stream dropped as malformed (not JSON, not an "
            "event, or a field that cannot be a label value).",
            ["account"],
            registry=None,
        )
        self.future_events = Counter(
            "binance_pm_stream_future_events",
            "Events of the account's user data stream whose time E was more than a day ahead "
            "of the clock: not used to order the account's risk events.",
            ["account"],
            registry=None,
        )
        self._metrics = (
            self.up,
            self.last_event,
            self.events,
            self.reconnects,
            self.triggered,
            self.rejected,
            self.future_events,
        )
        for account in accounts:
            self.up.labels(account).set(0)
            for endpoint in TRIGGERED_ENDPOINTS:
                self.triggered.labels(account, endpoint)

    def stream_connected(self, account: str) -> None:
        self.up.labels(account).set(1)

    def stream_disconnected(self, account: str, reason: str) -> None:
        """The stream dropped (or was closed to be reopened, e.g. before 24 h) and will
        reconnect; `reason` is a short fixed word of the client's. Not on shutdown."""
        self.up.labels(account).set(0)
        self.reconnects.labels(account, reason).inc()

    def stream_event(self, account: str, event_type: str, event_time: float | None) -> None:
        """An event arrived; `event_time` is its E in epoch seconds, when it has one."""
        self.events.labels(account, event_type if event_type in STREAM_EVENTS else "other").inc()
        if event_time is not None:
            self.last_event.labels(account).set(event_time)

    def frame_rejected(self, account: str) -> None:
        self.rejected.labels(account).inc()

    def future_event(self, account: str) -> None:
        self.future_events.labels(account).inc()

    def forget(self, account: str) -> None:
        """The account is no longer polled (a reload removed it): its per-account series
        leave /metrics; its counters by event and reason stay until a restart."""
        for metric in (self.up, self.last_event):
            with contextlib.suppress(KeyError):  # never labelled
                metric.remove(account)
        for endpoint in TRIGGERED_ENDPOINTS:
            with contextlib.suppress(KeyError):
                self.triggered.remove(account, endpoint)

    def triggered_refresh(self, account: str, endpoints: Iterable[str]) -> None:
        """A triggered refresh of `account` reading `endpoints` started."""
        for endpoint in endpoints:
            self.triggered.labels(account, endpoint).inc()


class BudgetView(Protocol):
    """What the budget metrics read of one egress IP's budget (exporter.budget gives
    these as plain values, `WeightBudget.figures()`; neither module imports the other)."""

    @property
    def egress(self) -> str: ...
    @property
    def last_used_weight(self) -> int | None: ...
    @property
    def spent_total(self) -> int: ...
    @property
    def per_minute(self) -> float: ...
    @property
    def limit_per_minute(self) -> int: ...
    @property
    def paused_until(self) -> float: ...  # 0 when not paused
    @property
    def pauses(self) -> Mapping[str, int]: ...


class BudgetCollector(Collector):
    """Weight and pause state of each egress IP's budget, read at scrape time."""

    def __init__(self, budgets: Callable[[], Sequence[BudgetView]]) -> None:
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
            budget.add_metric([b.egress], b.per_minute)
            limit.add_metric([b.egress], b.limit_per_minute)
            paused.add_metric([b.egress], b.paused_until)
            for reason in ("high_water", "rate_limited", "banned", "waf_blocked"):
                pauses.add_metric([b.egress, reason], b.pauses.get(reason, 0))
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


class ReloadState(Protocol):
    """How the last reload of something went."""

    successful: bool
    last_success: float


@dataclass
class ReloadStatus:
    """How the last config reload went; the start counts as a successful load."""

    successful: bool
    #: when the running config was loaded (epoch seconds)
    last_success: float


class ReloadCollector(Collector):
    """Prometheus's own names for the same thing (prometheus_config_last_reload_*), for the
    config (`binance_pm_config_...`) or the web config (`binance_pm_web_config_...`)."""

    def __init__(self, status: ReloadState, name: str, what: str) -> None:
        self._status = status
        self._name = f"binance_pm_{name}_last_reload"
        self._what = what

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            f"{self._name}_successful",
            f"1 when the last {self._what} reload succeeded (or none was tried); 0 when it "
            f"failed and the previous {self._what} is still in use.",
            value=1.0 if self._status.successful else 0.0,
        )
        yield GaugeMetricFamily(
            f"{self._name}_success_timestamp_seconds",
            f"When the {self._what} in use was loaded: at start, or by the last successful reload.",
            value=self._status.last_success,
        )
