"""The collectors, one module per Binance endpoint; importing this package registers the
built-in ones (`registry.registered()` then lists them, in this order)."""

from __future__ import annotations

from collections.abc import Mapping

# The order of these imports is the order of registration, and so of the requests of a
# refresh and of the families on /metrics.
from exporter.collectors import balance

# isort: split
from exporter.collectors import account

# isort: split
from exporter.collectors import um_account

# isort: split
from exporter.collectors import cm_account

# isort: split
from exporter.collectors.registry import (
    Collector,
    Request,
    enabled,
    families,
    refresh_weight,
    register,
    registered,
    unregister,
)


def weight_of(switches: Mapping[str, bool]) -> int:
    """w: the weight of one account refresh with the collectors `switches` turn on."""
    return refresh_weight(enabled(switches))


__all__ = [
    "Collector",
    "Request",
    "account",
    "balance",
    "cm_account",
    "enabled",
    "families",
    "refresh_weight",
    "register",
    "registered",
    "um_account",
    "unregister",
    "weight_of",
]
