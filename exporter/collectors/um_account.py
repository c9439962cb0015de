"""GET /papi/v1/um/account (weight 5): the USD-M futures book's margin per asset and per
open position. Off by default: `collect.um_account: true`; `collect.positions: false`
keeps the per-asset series only."""

from __future__ import annotations

from exporter import fields
from exporter.collectors.margin import FuturesAccount, futures_collector
from exporter.collectors.registry import Collector, register
from exporter.weights import WEIGHTS

PATH = "/papi/v1/um/account"

COLLECTOR: Collector[FuturesAccount] = register(
    futures_collector(
        "um_account", PATH, WEIGHTS["um_account"], fields.UM_ASSETS, fields.UM_POSITIONS
    )
)
