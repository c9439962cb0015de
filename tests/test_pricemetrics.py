"""The price families: one series per asset held, against golden text and promtool."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from support.systools import require
from test_collector import seed_store

from exporter.binance.models import AssetBalance
from exporter.pricemetrics import PriceCollector
from exporter.prices import PriceBook, PriceStore
from exporter.snapshot import SnapshotStore

GOLDEN = Path(__file__).parent / "fixtures" / "golden_prices.prom"
USD = frozenset({"USDT", "USDC", "FDUSD"})
T = 1_700_000_030.0


def held_store() -> SnapshotStore:
    """The seed accounts, desk-b holding BTC, ZK (BTC pair only), LDUSDT and NOPE too."""
    store = seed_store()
    extra = tuple(AssetBalance(a, {"totalWalletBalance": 1.0}) for a in ("BTC", "ZK", "LDUSDT"))
    desk_b = store.get("desk-b")
    store.replace(replace(desk_b, balances=(*extra, AssetBalance("NOPE"))))
    return store


def price_store() -> PriceStore:
    book = PriceBook(USD).updated({"BTCUSDT": 65000.0, "ETHUSDT": 3200.0}, T - 30)
    return PriceStore(book.updated({"BTCUSDT": 66000.0, "ZKBTC": 0.000002}, T))


def render(snapshots: SnapshotStore, prices: PriceStore) -> str:
    registry = CollectorRegistry()
    registry.register(PriceCollector(snapshots, prices))
    return generate_latest(registry).decode()


def test_prices_of_held_assets_render_to_the_golden_exposition(
    request: pytest.FixtureRequest,
) -> None:
    text = render(held_store(), price_store())
    if request.config.getoption("--update-golden"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_only_held_assets_have_a_series() -> None:
    text = render(held_store(), price_store())
    assert 'asset="ETH"' not in text  # quoted, but no account holds it
    assert 'asset="NOPE"' not in text  # held, but no route to USD
    assert 'binance_pm_asset_price_usd{asset="ZK"} 0.132' in text


def test_before_the_first_fetch_only_usd_assets_have_a_price_and_no_time() -> None:
    text = render(held_store(), PriceStore(PriceBook(USD)))
    assert 'binance_pm_asset_price_usd{asset="USDT"} 1.0' in text
    assert 'asset="BTC"' not in text
    assert "binance_pm_price_update_timestamp_seconds{" not in text


def test_promtool_check_metrics_is_silent() -> None:
    result = subprocess.run(
        [require("promtool"), "check", "metrics"],
        input=render(held_store(), price_store()).encode(),
        capture_output=True,
        check=False,
    )
    assert result.stdout.decode() + result.stderr.decode() == ""
    assert result.returncode == 0
