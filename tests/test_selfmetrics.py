"""The exporter's own metrics: what they expose, and no global state touched to get there."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from support.harness import accounts, sim_config

from exporter.app import Exporter
from exporter.collector import FAMILIES
from exporter.selfmetrics import Instruments


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_request_counters_have_no_created_series(fmt: str) -> None:
    registry = CollectorRegistry()
    instruments = Instruments(registry)
    instruments.requests.labels("balance", "success").inc()
    instruments.duration.labels("balance").observe(0.07)
    render = generate_latest if fmt == "text" else openmetrics.generate_latest
    text = render(registry).decode()
    assert 'binance_pm_requests_total{endpoint="balance",outcome="success"} 1.0' in text
    assert 'binance_pm_request_duration_seconds_bucket{endpoint="balance",le="0.1"} 1.0' in text
    assert "_created" not in text


def test_an_exporter_leaves_prometheus_clients_settings_alone() -> None:
    exporter = Exporter(sim_config("http://127.0.0.1:1", accounts(2)))
    exporter.instruments.requests.labels("balance", "success").inc()
    assert "_created" not in generate_latest(exporter.registry).decode()
    # Anyone else's counters in the same process keep their `_created` series.
    registry = CollectorRegistry()
    Counter("other_things", "Things.", registry=registry).inc()
    assert "other_things_created" in generate_latest(registry).decode()


def test_the_served_registry_holds_the_live_metrics_only() -> None:
    exporter = Exporter(sim_config("http://127.0.0.1:1", accounts(2)))
    names = {metric.name for metric in exporter.registry.collect()}
    assert "binance_pm_requests" in names
    assert "binance_pm_ip_weight_limit_per_minute" in names
    assert "binance_pm_exporter_build_info" in names
    assert names.isdisjoint(family.name for family in FAMILIES)  # the cache serves those
