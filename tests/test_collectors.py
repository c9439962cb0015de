"""The collector registry, proven by the UM and CM margin collectors and by a toy collector
the test registers itself: each shows on /metrics, in storage and in the weight arithmetic
through the poller, storage and scrape code that name no collector."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import statistics
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from support import metrics
from support.harness import RunningExporter, accounts
from support.systools import require
from support.waits import wait_until

from exporter import fields
from exporter.binance.client import BinanceClient, Credentials
from exporter.binance.errors import InvalidResponse
from exporter.binance.events import StreamEvent, parse_event
from exporter.binance.signing import HmacSigner
from exporter.budget import WeightBudget, refresh_interval, shard_limits
from exporter.collectors import (
    Collector,
    Request,
    enabled,
    register,
    registered,
    unregister,
    weight_of,
)
from exporter.collectors.margin import FuturesAccount
from exporter.collectors.registry import NOTHING_SKIPPED, Skipped, in_parts
from exporter.collectors.um_account import COLLECTOR as UM
from exporter.config import Config, parse_config
from exporter.families import Family
from exporter.poller import EgressPoller, PollSettings, Target
from exporter.selfmetrics import Instruments
from exporter.simulator import Simulator
from exporter.simulator.demo import GeneratedAccount, exporter_config
from exporter.simulator.endpoints import ENDPOINTS, Endpoint
from exporter.simulator.virtualtime import EventClock
from exporter.snapshot import AccountSnapshot, SnapshotStore
from exporter.storage import StateFile
from exporter.summary import summarize
from exporter.triggers import books_moved, classify

FAST = {"ip_weight_limit_per_minute": 60000, "share": 1.0, "min_interval_seconds": 1}


def config(url: str, generated: list[GeneratedAccount], **collect: Any) -> Config:
    data = exporter_config(url, generated, budget=FAST)
    data["binance"]["timeout_seconds"] = 2
    data["collect"] = collect
    return parse_config(data, environ={}, base_dir=Path.cwd())


@pytest.fixture
def sim2() -> Iterator[tuple[Simulator, list[GeneratedAccount]]]:
    generated = accounts(2)
    with Simulator([g.sim_account for g in generated], ip_weight_limit=60000) as sim:
        yield sim, generated


BOOKS = (
    ("um", fields.UM_ASSETS, fields.UM_POSITIONS),
    ("cm", fields.CM_ASSETS, fields.CM_POSITIONS),
)


def expected_samples(sim: Simulator, account: str) -> dict[tuple[str, tuple[str, ...]], float]:
    """Every margin sample the simulator's answers make, from the answers themselves."""
    expected = {}
    for book, asset_fields, position_fields in BOOKS:
        answer = sim.futures_account(account, book)
        for record in answer["assets"]:
            for f in asset_fields:
                expected[(f.metric, (record["asset"],))] = float(record[f.api])
        for record in answer["positions"]:
            if float(record["positionAmt"]) == 0:
                continue
            for f in position_fields:
                key = (record["positionSide"], record["symbol"])
                expected[(f.metric, key)] = float(record[f.api])
    return expected


def test_every_margin_series_matches_the_simulators_answer(sim2) -> None:
    sim, generated = sim2
    with RunningExporter(config(sim.url, generated, um_account=True, cm_account=True)) as running:
        for account in ("acct-00", "acct-01"):
            wait_until(lambda a=account: running.sample("binance_pm_up", account=a) == 1)
        text = running.metrics_text()
        scraped = metrics.parse_metrics(text)  # one scrape, parsed once: every sample from it
        for account in ("acct-00", "acct-01"):
            expected = expected_samples(sim, account)
            closed = [
                p["symbol"]
                for p in sim.futures_account(account, "um")["positions"]
                if float(p["positionAmt"]) == 0
            ]
            assert closed, "the simulator lists a closed position too"
            assert len(expected) > 20
            for (metric, labels), value in expected.items():
                if len(labels) == 1:
                    got = metrics.sample(scraped, metric, account=account, asset=labels[0])
                else:
                    got = metrics.sample(
                        scraped,
                        metric,
                        account=account,
                        position_side=labels[0],
                        symbol=labels[1],
                    )
                assert got == value, (account, metric, labels)
            assert f'account="{account}",position_side="BOTH",symbol="{closed[0]}"' not in text
        paths = {r.path for r in sim.requests}
        assert {"/papi/v1/um/account", "/papi/v1/cm/account"} <= paths
        assert sum(r.status == 429 for r in sim.requests) == 0


def test_a_closed_position_leaves_metrics_and_positions_off_keeps_assets(sim2) -> None:
    sim, generated = sim2
    answer = sim.futures_account("acct-00", "um")
    position = next(p for p in answer["positions"] if float(p["positionAmt"]) != 0)
    labels = {"account": "acct-00", "position_side": "BOTH", "symbol": position["symbol"]}
    with RunningExporter(config(sim.url, generated, um_account=True)) as running:
        wait_until(lambda: running.sample("binance_pm_um_position_amount", **labels) is not None)
        position["positionAmt"] = "0"
        sim.set_futures_account("acct-00", "um", answer)
        wait_until(lambda: running.sample("binance_pm_um_position_amount", **labels) is None)
        assert running.sample("binance_pm_um_position_maint_margin", **labels) is None
        assert "binance_pm_cm_asset" not in running.metrics_text()  # cm_account is off
    with RunningExporter(config(sim.url, generated, um_account=True, positions=False)) as running:
        wait_until(lambda: running.sample("binance_pm_up", account="acct-00") == 1)
        text = running.metrics_text()
        assert 'binance_pm_um_asset_maint_margin{account="acct-00",asset="USDT"}' in text
        assert "binance_pm_um_position_amount{" not in text


def test_promtool_check_metrics_with_positions(sim2) -> None:
    promtool = require("promtool")
    sim, generated = sim2
    with RunningExporter(config(sim.url, generated, um_account=True, cm_account=True)) as running:
        wait_until(lambda: running.sample("binance_pm_up", account="acct-01") == 1)
        wait_until(lambda: "binance_pm_cm_position_amount{" in running.metrics_text())
        text = running.metrics_text()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_margin_collectors_add_their_weight_and_check_config_shows_it(tmp_path) -> None:
    generated = accounts(200)
    data = exporter_config("http://127.0.0.1:1", generated)
    data["collect"] = {"um_account": True, "cm_account": True}
    on = parse_config(data, environ={}, base_dir=tmp_path)
    assert weight_of(on.collect.switches()) == 20 + 20 + 5 + 5
    off = parse_config({**data, "collect": {}}, environ={}, base_dir=tmp_path)
    assert weight_of(off.collect.switches()) == 40
    limits = shard_limits(on.budget)
    interval = refresh_interval(200, 50, limits, on.budget.min_interval_seconds)
    assert interval > refresh_interval(200, 40, limits, on.budget.min_interval_seconds)
    text = summarize(on)
    assert "GET /papi/v1/um/account (5) + GET /papi/v1/cm/account (5) = 50 weight" in text
    assert f"-> each account every {interval:g} s" in text or f"every {round(interval, 1):g} s" in (
        text
    )


def test_a_malformed_margin_answer_is_one_clear_line() -> None:
    with pytest.raises(InvalidResponse) as caught:
        UM.parse({"assets": [{"asset": "USDT", "maintMargin": "1e5"}], "positions": []})
    assert str(caught.value).count("\n") == 0
    assert "assets[0] USDT: maintMargin" in str(caught.value)
    with pytest.raises(InvalidResponse):
        UM.parse({"assets": {}, "positions": []})
    with pytest.raises(InvalidResponse):
        UM.parse({"positions": [{"symbol": "BTC\nUSDT", "positionSide": "BOTH"}]})
    part = UM.parse(
        {
            "assets": [],
            "positions": [
                {"symbol": "BTCUSDT", "positionSide": "BOTH", "positionAmt": "0"},
                {"symbol": "ETHUSDT", "positionSide": "LONG", "positionAmt": "-1.5"},
            ],
        }
    )
    assert [(p.symbol, p.side, p.values["positionAmt"]) for p in part.positions] == [
        ("ETHUSDT", "LONG", -1.5)
    ]


def test_margin_parts_survive_a_restart_and_a_bad_part_drops_its_account(tmp_path) -> None:
    part = UM.parse(
        {
            "assets": [{"asset": "USDT", "maintMargin": "12.5", "updateTime": 1700000000000}],
            "positions": [
                {
                    "symbol": "BTCUSDT",
                    "positionSide": "BOTH",
                    "positionAmt": "0.5",
                    "leverage": "20",
                }
            ],
        }
    )
    account = UM.put(AccountSnapshot("a", 10.0, attempted=True, up=True), part)
    state = StateFile(tmp_path)
    assert state.write(SnapshotStore([account]).current, time.time())
    restored = StateFile(tmp_path).load({"a"})
    assert UM.get(restored["a"]) == part
    data = json.loads(state.path.read_text())
    data["accounts"]["a"]["parts"]["um_account"]["positions"][0]["values"]["leverage"] = "x"
    data["accounts"]["b"] = data["accounts"]["a"]
    state.path.write_text(json.dumps(data))
    again = StateFile(tmp_path)
    assert again.load({"a", "b"}) == {}
    assert again.dropped == {"malformed": 2}


# --- a collector of the test's own --------------------------------------------------------

TOY_PATH = "/papi/v1/toy"
TOY_WEIGHT = 7


def _toy_parse(payload: object) -> float:
    if not isinstance(payload, dict) or not isinstance(payload.get("level"), str):
        raise InvalidResponse("toy: expected {'level': decimal string}")
    return float(payload["level"])


def _toy_collector() -> Collector[float]:
    get, put = in_parts("toy")

    def samples(account: AccountSnapshot) -> Iterator[tuple[tuple[str, ...], float]]:
        if (level := get(account)) is not None:
            yield (), level

    def decode(saved: object) -> float:
        if not isinstance(saved, float):
            raise TypeError("not a number")
        return saved

    return Collector(
        name="toy",
        request=Request(TOY_PATH, TOY_WEIGHT, (("kind", "demo"),)),
        parse=_toy_parse,
        families=(
            Family(
                "binance_pm_toy_level", "A toy level (level of GET /toy).", ("account",), samples
            ),
        ),
        default=True,
        get=get,
        put=put,
        encode=lambda level: level,
        decode=decode,
    )


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector[float]]:
    # the simulator's sixth PM endpoint: a level per account, from its name
    def serve(state: Any, account: Any, params: dict[str, str]) -> Any:
        assert params.get("kind") == "demo"
        return {"level": f"{len(account.name)}.25"}

    monkeypatch.setitem(ENDPOINTS, ("GET", TOY_PATH), Endpoint(TOY_WEIGHT, "signed", serve))
    collector = register(_toy_collector())  # the one call
    try:
        yield collector
    finally:
        unregister("toy")


# A collector of the test's own whose answer joins the last part, as balance's does:
# `merge` keeps the highest level seen, `skipped` reports the records the parser left out.
# The poller counts and logs them and merges the parts with no line of its own for it.

_PEAK_PATH = "/papi/v1/toy-peak"


def _peak_parse(payload: object) -> tuple[float | None, int]:
    """The answer's level (None when its one record is malformed), and the records skipped."""
    if not isinstance(payload, dict) or not isinstance(payload.get("levels"), list):
        raise InvalidResponse("toy-peak: expected {'levels': [...]}")
    good = [float(x) for x in payload["levels"] if isinstance(x, str)]
    return (max(good) if good else None), len(payload["levels"]) - len(good)


def _peak_collector() -> Collector[float]:
    get, put = in_parts("toy_peak")

    def samples(account: AccountSnapshot) -> Iterator[tuple[tuple[str, ...], float]]:
        if (level := get(account)) is not None:
            yield (), level

    def merge(previous: float | None, parsed: tuple[float | None, int]) -> float:
        levels = [x for x in (previous, parsed[0]) if x is not None]
        return max(levels) if levels else 0.0

    def skipped(parsed: tuple[float | None, int]) -> Skipped:
        return (
            Skipped({"malformed": parsed[1]}, ("levels: not a string",))
            if parsed[1]
            else (NOTHING_SKIPPED)
        )

    return Collector(
        name="toy_peak",
        request=Request(_PEAK_PATH, 3),
        parse=_peak_parse,
        families=(Family("binance_pm_toy_peak", "The highest toy level.", ("account",), samples),),
        default=True,
        get=get,
        put=put,
        encode=lambda level: level,
        decode=float,
        merge=merge,
        skipped=skipped,
    )


def test_a_collectors_merge_and_skipped_records_go_through_the_poller_alike(
    sim2, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim, generated = sim2
    answers = {"levels": ["5"]}

    def serve(state: Any, account: Any, params: dict[str, str]) -> Any:
        return answers

    monkeypatch.setitem(ENDPOINTS, ("GET", _PEAK_PATH), Endpoint(3, "signed", serve))
    register(_peak_collector())
    try:
        with RunningExporter(config(sim.url, generated)) as running:
            wait_until(lambda: running.sample("binance_pm_toy_peak", account="acct-00") == 5.0)
            answers = {"levels": ["2", 7]}  # lower, and a malformed record
            dropped = {"source": "toy_peak", "reason": "malformed"}
            # 4: each account's refresh has had the new answer, about twice
            wait_until(
                lambda: (running.sample("binance_pm_dropped_records_total", **dropped) or 0) >= 4
            )
            assert running.sample("binance_pm_toy_peak", account="acct-00") == 5.0  # merged
            answers = {"levels": ["9"]}
            wait_until(lambda: running.sample("binance_pm_toy_peak", account="acct-01") == 9.0)
    finally:
        unregister("toy_peak")


def test_a_toy_collector_registered_by_one_call_shows_everywhere(sim2, toy, tmp_path) -> None:
    sim, generated = sim2
    assert registered()[-1] is toy
    cfg = config(sim.url, generated)
    assert weight_of(cfg.collect.switches()) == 20 + 20 + TOY_WEIGHT
    with RunningExporter(cfg) as running:
        wait_until(lambda: running.sample("binance_pm_toy_level", account="acct-01") == 7.25)
        interval = running.sample("binance_pm_refresh_interval_seconds", account="acct-01")
        snapshot = running.exporter.store.current
        assert "# HELP binance_pm_toy_level A toy level" in running.metrics_text()
    limits = shard_limits(cfg.budget)
    assert interval == refresh_interval(2, 47, limits, cfg.budget.min_interval_seconds)
    toy_requests = [r for r in sim.requests if r.path == TOY_PATH]
    assert toy_requests
    assert all(r.status == 200 for r in toy_requests)
    state = StateFile(tmp_path)
    assert state.write(snapshot, time.time())
    assert json.loads(state.path.read_text())["accounts"]["acct-00"]["parts"] == {"toy": 7.25}
    assert toy.get(StateFile(tmp_path).load({"acct-00"})["acct-00"]) == 7.25


# --- stream events feed the same collectors ----------------------------------------------


def _account_update(book: str, positions: list[dict[str, str]]) -> StreamEvent:
    return parse_event(
        {
            "e": "ACCOUNT_UPDATE",
            "fs": book,
            "E": 1700000000000,
            "a": {"m": "ORDER", "B": [{"a": "USDT", "wb": "10", "cw": "10"}], "P": positions},
        }
    )


def test_an_account_update_of_a_books_positions_calls_for_its_collector() -> None:
    position = {"s": "BTCUSDT", "pa": "0.5", "ep": "60000", "up": "1", "ps": "BOTH"}
    assert books_moved(_account_update("UM", [position])) == {"um_account"}
    assert books_moved(_account_update("CM", [{**position, "s": "BTCUSD_PERP"}])) == {"cm_account"}
    assert books_moved(_account_update("UM", [])) == frozenset()


def test_a_triggered_read_reads_the_um_book_only_when_it_is_enabled(sim2) -> None:
    sim, generated = sim2
    position = {"s": "BTCUSDT", "pa": "0.5", "ep": "60000", "up": "1", "ps": "BOTH"}
    event = _account_update("UM", [position])
    need = classify(event, None)
    assert need is not None
    endpoints = need.endpoints | books_moved(event)  # as streams.py asks
    slow = {**FAST, "min_interval_seconds": 3600}
    for um_on in (True, False):
        data = exporter_config(sim.url, generated, budget=slow)
        data["collect"] = {"um_account": um_on}
        cfg = parse_config(data, environ={}, base_dir=Path.cwd())
        start = len(sim.requests)

        def paths(start: int = start) -> list[str]:
            return [r.path for r in sim.requests[start:] if r.account == "acct-00"]

        with RunningExporter(cfg) as running:
            wait_until(lambda: running.sample("binance_pm_up", account="acct-00") == 1)
            before = paths()
            poller = running.exporter.pollers[0]
            running.call_soon(poller.trigger, "acct-00", need.priority, endpoints, None)
            wait_until(lambda: paths().count("/papi/v1/balance") == 2)
            if um_on:
                wait_until(lambda: paths().count("/papi/v1/um/account") == 2)
            after = paths()
        um = "/papi/v1/um/account"
        assert before.count(um) == (1 if um_on else 0)
        assert after.count(um) == (2 if um_on else 0)  # the event read the book again
        assert after.count("/papi/v1/account") == 1  # the event did not move account info


# --- 200 accounts, both margin collectors, the default budget, on virtual time -----------


def test_200_accounts_with_both_margin_collectors_keep_the_budget(tmp_path) -> None:
    """The real poller and budget on virtual time, answered at once by a server that
    counts the exporter's weight per trailing 60 s as Binance does and answers 429 past B:
    the weight stays <= B in every window, no 429, and each account's polled interval is
    N·w/B with the new w, within 5 %."""
    n = 200
    data = exporter_config("http://binance.test", accounts(1))
    data["collect"] = {"um_account": True, "cm_account": True}
    cfg = parse_config(data, environ={}, base_dir=tmp_path)
    switches = cfg.collect.switches()
    w = weight_of(switches)
    assert w == 50
    limits = shard_limits(cfg.budget)
    b = limits.per_minute
    assert b == 1500  # the default budget
    interval = refresh_interval(n, w, limits, cfg.budget.min_interval_seconds)
    start = 1_700_000_010.0
    clock = EventClock(start)
    weights = {
        "/papi/v1/balance": 20,
        "/papi/v1/account": 20,
        "/papi/v1/um/account": 5,
        "/papi/v1/cm/account": 5,
        "/fapi/v1/time": 1,
    }
    log: list[tuple[float, str, str, int]] = []  # time, path, api key, status
    window: collections.deque[tuple[float, int]] = collections.deque()  # PM API's, 200s
    um_answer = {
        "assets": [{"asset": "USDT", "maintMargin": "10"}],
        "positions": [{"symbol": "BTCUSDT", "positionSide": "BOTH", "positionAmt": "1"}],
    }

    def answer(request: httpx.Request) -> httpx.Response:
        path, now = request.url.path, clock.time
        # the PM API's pool (the server time is on the futures host's own), trailing 60 s
        while window and window[0][0] <= now - 60:
            window.popleft()
        used = sum(weight for _, weight in window)
        status = 429 if path != "/fapi/v1/time" and used + weights[path] > b else 200
        log.append((now, path, request.headers.get("X-MBX-APIKEY", ""), status))
        if status == 200 and path != "/fapi/v1/time":
            window.append((now, weights[path]))
        if status == 429:
            return httpx.Response(429, json={"code": -1003, "msg": "Too many requests"})
        if path.endswith("/time"):
            return httpx.Response(200, json={"serverTime": int(now * 1000)})
        if path == "/papi/v1/account":
            return httpx.Response(200, json={"uniMMR": "3.5", "accountStatus": "NORMAL"})
        if path in ("/papi/v1/um/account", "/papi/v1/cm/account"):
            return httpx.Response(200, json=um_answer)
        return httpx.Response(200, json=[{"asset": "USDT", "crossMarginFree": "1.0"}])

    names = [f"acct-{i:03d}" for i in range(n)]
    store = SnapshotStore(AccountSnapshot(name, interval) for name in names)
    poller = EgressPoller(
        targets=[Target(x, Credentials(SecretStr(x), HmacSigner(SecretStr("s")))) for x in names],
        make_client=partial(
            BinanceClient,
            base_url="http://binance.test",
            timeout_seconds=100,
            recv_window_ms=5000,
            clock=clock,
            transport=httpx.MockTransport(answer),
        ),
        budget=WeightBudget("default", limits, clock=clock, sleep=clock.sleep),
        store=store,
        instruments=Instruments(CollectorRegistry()),
        settings=PollSettings(
            allows_asset=lambda a: True,
            interval=interval,
            collectors=enabled(switches),
            switches=switches,
        ),
        clock=clock,
        sleep=clock.sleep,
    )
    assert poller.settings.weight == w

    async def go() -> None:
        task = asyncio.create_task(poller.run())
        await clock.run_until(start + 3.5 * interval)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await poller.drain(1)

    asyncio.run(go())
    assert [s for *_, s in log].count(429) == 0
    spent = [(t, weights[p]) for t, p, _, _ in log if p != "/fapi/v1/time"]  # in time order
    worst = in_window = 0
    ends = iter(spent)
    end = next(ends, None)
    for t, x in spent:  # the 60 s window from each request on: [t, t + 60)
        while end is not None and end[0] < t + 60:
            in_window += end[1]
            end = next(ends, None)
        worst = max(worst, in_window)
        in_window -= x
    assert worst <= b
    gaps = [
        later - earlier
        for name in names
        for earlier, later in itertools.pairwise(
            t for t, p, key, _ in log if p == "/papi/v1/um/account" and key == name
        )
    ]
    expected = n * w / b * 60  # N·w/B
    mean = statistics.mean(gaps)
    print(  # the figures, for the report (pytest -s)
        f"200 accounts, w {w}, B {b:g}: worst 60 s window {worst}, 429s 0,"
        f" interval mean {mean:.1f} s / max {max(gaps):.1f} s against N·w/B {expected:.1f} s"
    )
    assert len(gaps) >= 2 * n
    assert abs(statistics.mean(gaps) / expected - 1) < 0.05, (statistics.mean(gaps), expected)
    assert max(gaps) < expected * 1.05
    part = store.get("acct-000").parts["um_account"]
    assert isinstance(part, FuturesAccount)
    assert part.positions[0].values["positionAmt"] == 1.0


def test_a_reload_turns_the_margin_collectors_and_positions_on_and_off(sim2) -> None:
    sim, generated = sim2
    configs = [
        config(sim.url, generated, um_account=True, positions=False),
        config(sim.url, generated, um_account=True),
        config(sim.url, generated),
    ]
    pending = list(configs[1:])
    with RunningExporter(configs[0], load=lambda: pending.pop(0)) as running:
        asset = {"account": "acct-00", "asset": "USDT"}
        wait_until(lambda: running.sample("binance_pm_um_asset_maint_margin", **asset) is not None)
        assert "binance_pm_um_position_amount{" not in running.metrics_text()
        assert running.exporter.reload() is None  # positions on
        wait_until(lambda: "binance_pm_um_position_amount{" in running.metrics_text())
        assert running.exporter.reload() is None  # um_account off: its series leave
        wait_until(lambda: "binance_pm_um_asset_maint_margin{" not in running.metrics_text())
        assert "# HELP binance_pm_um_asset_maint_margin" not in running.metrics_text()


def test_account_info_off_is_its_collectors_switch_and_the_rest_is_polled_alike(sim2) -> None:
    # `collect.account_info: false`: the account collector is off like any other, the
    # refresh reads the enabled ones (balance, um_account) the same way
    sim, generated = sim2
    cfg = config(sim.url, generated, account_info=False, um_account=True)
    assert weight_of(cfg.collect.switches()) == 20 + 5
    with RunningExporter(cfg) as running:
        wait_until(
            lambda: (
                running.sample("binance_pm_um_asset_maint_margin", account="acct-01", asset="USDT")
                is not None
            )
        )
        interval = running.sample("binance_pm_refresh_interval_seconds", account="acct-01")
        text = running.metrics_text()
    assert 'binance_pm_wallet_balance{account="acct-01"' in text
    assert "binance_pm_uni_mmr{" not in text
    assert "binance_pm_account_status{" not in text
    paths = {r.path for r in sim.requests}
    assert {"/papi/v1/balance", "/papi/v1/um/account"} <= paths
    assert "/papi/v1/account" not in paths
    limits = shard_limits(cfg.budget)
    assert interval == refresh_interval(2, 25, limits, cfg.budget.min_interval_seconds)
