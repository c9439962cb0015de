import json
from pathlib import Path

import pytest

from exporter.binance.errors import InvalidResponse
from exporter.binance.models import parse_account, parse_balances, parse_decimal

FIXTURES = Path(__file__).parent / "fixtures"


def test_seed_array_example() -> None:
    parsed = parse_balances(json.loads((FIXTURES / "balance_seed.json").read_text()))
    (usdt,) = parsed.balances
    assert usdt.asset == "USDT"
    assert usdt.values["totalWalletBalance"] == 122607.35137903
    assert usdt.values["crossMarginAsset"] == 92.27530794
    assert usdt.values["negativeBalance"] == 0
    assert "cmUnrealizedPNL" not in usdt.values  # "" means no value, not 0
    assert usdt.update_time == 1617939110.373
    assert parsed.problems == ()


def test_single_object_shape_lacks_cross_margin_asset() -> None:
    parsed = parse_balances(json.loads((FIXTURES / "balance_seed_single.json").read_text()))
    (usdt,) = parsed.balances
    assert "crossMarginAsset" not in usdt.values
    assert usdt.values["crossMarginBorrowed"] == 10.0


def test_unknown_fields_are_ignored_and_missing_fields_absent() -> None:
    parsed = parse_balances([{"asset": "BTC", "newField": {"x": 1}, "umWalletBalance": "1.5"}])
    assert dict(parsed.balances[0].values) == {"umWalletBalance": 1.5}


@pytest.mark.parametrize(
    "bad",
    [
        {"asset": "BTC", "crossMarginFree": 1.5},  # a number where a string belongs
        {"asset": "BTC", "crossMarginFree": None},
        {"asset": "BTC", "crossMarginFree": "NaN"},
        {"asset": "BTC", "crossMarginFree": "1e400"},
        {"asset": "BTC", "crossMarginFree": "9" * 400},
        {"asset": "BTC", "updateTime": "1617939110373"},
        {"asset": 7},
        {"crossMarginFree": "1"},
        "BTC",
        None,
    ],
)
def test_a_malformed_record_is_skipped_and_the_rest_used(bad: object) -> None:
    parsed = parse_balances([bad, {"asset": "USDT", "crossMarginFree": "2"}])
    assert [b.asset for b in parsed.balances] == ["USDT"]
    assert len(parsed.problems) == 1
    assert parsed.problems[0].startswith("record 0: ")


def test_skipped_assets_are_named_so_their_last_values_can_be_kept() -> None:
    parsed = parse_balances([{"asset": "BTC", "crossMarginFree": 3}, {"asset": "ETH"}])
    assert parsed.skipped_assets == {"BTC"}


@pytest.mark.parametrize("payload", [None, 3, "x", {"code": -1}, [1, 2]])
def test_unusable_payloads_raise_invalid_response(payload: object) -> None:
    with pytest.raises(InvalidResponse):
        parse_balances(payload if payload != {"code": -1} else [payload])


def test_empty_array_is_an_account_without_assets() -> None:
    assert parse_balances([]).balances == ()


def test_account_info() -> None:
    info = parse_account(
        {
            "uniMMR": "5.167",
            "accountEquity": "122607.35",
            "accountStatus": "NORMAL",
            "updateTime": 1657707212154,
            "unknown": "x",
            "totalMarginOpenLoss": "",
        }
    )
    assert info.values == {"uniMMR": 5.167, "accountEquity": 122607.35}
    assert info.status == "NORMAL"
    assert info.update_time == 1657707212.154


@pytest.mark.parametrize(
    "payload", [[], {"uniMMR": 5}, {"uniMMR": "inf"}, {"accountStatus": 3}, {"updateTime": -1}]
)
def test_bad_account_info_raises(payload: object) -> None:
    with pytest.raises(InvalidResponse):
        parse_account(payload)


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0.0), ("-1.5", -1.5), ("00.10", 0.1), ("", None)]
)
def test_parse_decimal(text: str, value: float | None) -> None:
    assert parse_decimal(text) == value
