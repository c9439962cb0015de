"""Reading the exposition text of /metrics: every sample by name and labels."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by its name and its set of labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(metrics: Samples | str, name: str, **labels: str) -> float | None:
    """The value of the series `name{labels}` (exactly these labels), or None when absent;
    `metrics` is exposition text or what parse_metrics made of it."""
    parsed = parse_metrics(metrics) if isinstance(metrics, str) else metrics
    return parsed.get((name, frozenset(labels.items())))
