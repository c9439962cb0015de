"""The live self-metrics' writer: prometheus_client's bytes, or None where it must decide."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from support.harness import accounts, sim_config

from exporter import livetext
from exporter.app import Exporter


class Fixed(Collector):
    def __init__(self, *metrics: Metric) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def reference(registry: CollectorRegistry, fmt: str) -> bytes:
    return generate_latest(registry) if fmt == "text" else openmetrics.generate_latest(registry)


def tricky_families() -> list[Metric]:
    counter = CounterMetricFamily("things", 'Things "quoted"\nand \\ slashed.', labels=["kind"])
    counter.add_metric(['a "b"\\c\nd'], 3)
    gauge = GaugeMetricFamily("level", "A level.", labels=["z", "a"])
    gauge.add_metric(["ü", ""], float("nan"))
    gauge.add_metric(["1", "2"], float("inf"))
    gauge.add_metric(["3", "4"], 1e-7)
    histogram = HistogramMetricFamily("took_seconds", "Took.", labels=["op"])
    histogram.add_metric(["x"], [("0.1", 0), ("1.0", 2), ("+Inf", 3)], sum_value=4.5)
    return [
        counter,
        gauge,
        histogram,
        InfoMetricFamily("build", "Build.", value={"version": "1.2"}),
        StateSetMetricFamily("mode", "Mode.", value={"on": True, "off": False}),
        CounterMetricFamily("ticks", "Ticks.", value=12),
        GaugeMetricFamily("empty", "None."),
        UnknownMetricFamily("odd", "Odd.", value=2),
    ]


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_the_bytes_are_prometheus_clients(fmt: str) -> None:
    fixed = CollectorRegistry()
    fixed.register(Fixed(*tricky_families()))
    assert livetext.render(fixed.collect(), fmt) == reference(fixed, fmt)  # type: ignore[arg-type]


def test_text_leaves_created_series_to_prometheus_client() -> None:
    registry = CollectorRegistry()
    Histogram("took_seconds", "Took.", registry=registry).observe(0.5)
    assert livetext.render(registry.collect(), "text") is None


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_the_exporters_live_registry_is_written_by_us(fmt: str) -> None:
    exporter = Exporter(sim_config("http://127.0.0.1:1", accounts(2)))
    exporter.instruments.requests.labels("balance", "success").inc()
    exporter.instruments.duration.labels("balance").observe(0.07)
    fixed = CollectorRegistry()
    fixed.register(Fixed(*exporter.registry.collect()))
    rendered = livetext.render(fixed.collect(), fmt)  # type: ignore[arg-type]
    assert rendered is not None
    assert rendered == reference(fixed, fmt)


@pytest.mark.parametrize(
    "metric",
    [
        GaugeMetricFamily("bad.name", "Dotted.", value=1),
        GaugeMetricFamily("unit_seconds", "With a unit.", value=1, unit="seconds"),
        CounterMetricFamily("c", "Created.", value=1, created=5.0),
    ],
)
def test_what_only_prometheus_client_writes_is_left_to_it(metric: Metric) -> None:
    assert livetext.render([metric], "text") is None


def test_a_label_name_outside_the_legacy_set_is_left_to_prometheus_client() -> None:
    gauge = GaugeMetricFamily("g", "G.", labels=["bad.label"])
    gauge.add_metric(["v"], 1)
    assert livetext.render([gauge], "openmetrics") is None
