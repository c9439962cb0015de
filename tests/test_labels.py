"""The one check for label values from outside (exporter/labels.py), and the log throttle
that keeps a hostile peer's records from filling the disk (exporter/throttle.py)."""

from __future__ import annotations

import json

import pytest

from exporter.binance.errors import InvalidResponse
from exporter.binance.events import MalformedFrame, parse_frame
from exporter.binance.models import MAX_ASSETS_PER_ANSWER, parse_account, parse_balances
from exporter.labels import LABEL_MAX_CHARS, is_label, label_problem
from exporter.throttle import LogThrottle

#: every hostile string of issue 17, and its kin
HOSTILE = {
    "lone surrogate": "X\ud800",
    "low surrogate": "\udfffBTC",
    "newline": "BTC\nbinance_pm_up 0",
    "NUL": "BTC\x00",
    "escape": "\x1b[31mBTC",
    "DEL": "BTC\x7f",
    "right-to-left override": "BTC\u202e",
    "line separator": "BTC\u2028",
    "overlong": "A" * (LABEL_MAX_CHARS + 1),
    "a megabyte": "A" * 1_000_000,
    "empty": "",
}


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_strings_are_no_labels(value: str) -> None:
    problem = label_problem(value)
    assert problem is not None
    assert value not in problem or not value  # the reason never quotes the value


@pytest.mark.parametrize("value", ["BTC", "LDUSDT", "1000SATS", "MARGIN_CALL", "A" * 128, "été"])
def test_ordinary_names_are_labels(value: str) -> None:
    assert is_label(value)


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_each_parser_drops_the_record_and_keeps_the_rest(value: str) -> None:
    parsed = parse_balances([{"asset": value, "crossMarginFree": "1"}, {"asset": "BTC"}])
    assert [b.asset for b in parsed.balances] == ["BTC"]
    assert dict(parsed.dropped) == {"label": 1}
    with pytest.raises(InvalidResponse):
        parse_account({"accountStatus": value})
    frame = json.dumps({"e": "riskLevelChange", "E": 1, "s": value, "u": "1.2"})
    with pytest.raises(MalformedFrame) as raised:
        parse_frame(frame)
    assert value not in str(raised.value) or not value


def test_a_balance_answer_is_read_up_to_its_cap() -> None:
    records = [{"asset": f"A{i}", "crossMarginFree": "1"} for i in range(100_000)]
    parsed = parse_balances(records)
    assert len(parsed.balances) == MAX_ASSETS_PER_ANSWER
    assert dict(parsed.dropped) == {"over_cap": 100_000 - MAX_ASSETS_PER_ANSWER}
    assert len(parsed.problems) == 1


def test_the_problems_of_one_answer_are_bounded_and_all_counted() -> None:
    records = [{"asset": f"A{i}", "crossMarginFree": "x"} for i in range(1000)]
    parsed = parse_balances([*records, {"asset": "BTC"}])
    assert len(parsed.problems) == 10
    assert dict(parsed.dropped) == {"malformed": 1000}


def test_the_throttle_lets_one_line_a_minute_through_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = LogThrottle(60, clock=lambda: now[0])
    assert throttle.allow("a") == 0
    assert [throttle.allow("a") for _ in range(3)] == [None, None, None]
    assert throttle.allow("b") == 0  # keys apart
    now[0] = 59.9
    assert throttle.allow("a") is None
    now[0] = 60.0
    assert throttle.allow("a") == 4
    now[0] = 200.0
    assert throttle.allow("a") == 0
