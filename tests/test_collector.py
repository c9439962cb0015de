"""The snapshot collector's exposition, against golden text and promtool."""

import json
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from support.systools import require

from exporter.binance.models import parse_account, parse_balances
from exporter.collector import SnapshotCollector
from exporter.snapshot import AccountSnapshot, SnapshotStore

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden_seed.prom"


def seed_store() -> SnapshotStore:
    balances = parse_balances(json.loads((FIXTURES / "balance_seed.json").read_text())).balances
    info = parse_account(json.loads((FIXTURES / "account_seed.json").read_text()))
    return SnapshotStore(
        [
            AccountSnapshot(
                "desk-a", 16.0, balances, info, up=True, attempted=True, last_success=1700000000.5
            ),
            AccountSnapshot("desk-b", 16.0, attempted=True, consecutive_failures=3),
        ]
    )


def render(store: SnapshotStore) -> str:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(store))
    return generate_latest(registry).decode()


def test_seed_example_renders_to_the_golden_exposition(request: pytest.FixtureRequest) -> None:
    text = render(seed_store())
    if request.config.getoption("--update-golden"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_empty_cm_unrealized_pnl_is_absent_not_zero() -> None:
    text = render(seed_store())
    assert "binance_pm_cm_unrealized_pnl{" not in text
    assert 'binance_pm_um_unrealized_pnl{account="desk-a",asset="USDT"} 23.72469206' in text


def test_assets_and_accounts_that_leave_the_snapshot_leave_the_exposition() -> None:
    store = seed_store()
    before = render(store)
    assert 'asset="USDT"' in before
    store.replace(AccountSnapshot("desk-a", 16.0, (), None, up=True, attempted=True))
    after = render(store)
    assert 'asset="USDT"' not in after
    assert "binance_pm_uni_mmr{" not in after


def test_every_help_names_its_api_field() -> None:
    text = render(seed_store())
    helps = [line for line in text.splitlines() if line.startswith("# HELP binance_pm_")]
    data_helps = [h for h in helps if "GET /papi/v1/" in h]
    # balance fields and their time, account fields, status and time
    assert len(data_helps) == 11 + 1 + 8 + 2


def test_promtool_check_metrics_is_silent() -> None:
    result = subprocess.run(
        [require("promtool"), "check", "metrics"],
        input=render(seed_store()).encode(),
        capture_output=True,
        check=False,
    )
    assert result.stdout.decode() + result.stderr.decode() == ""
    assert result.returncode == 0
