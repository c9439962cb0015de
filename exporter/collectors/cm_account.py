"""GET /papi/v1/cm/account (weight 5): the COIN-M futures book's margin per asset and per
open position. Off by default: `collect.cm_account: true`; `collect.positions: false`
keeps the per-asset series only."""

from __future__ import annotations

from exporter import fields
from exporter.collectors.margin import FuturesAccount, futures_collector
from exporter.collectors.registry import Collector, register
from exporter.weights import WEIGHTS

PATH = "/papi/v1/cm/account"

COLLECTOR: Collector[FuturesAccount] = register(
    futures_collector(
        "cm_account", PATH, WEIGHTS["cm_account"], fields.CM_ASSETS, fields.CM_POSITIONS
    )
)
