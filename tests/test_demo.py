"""The demo shows its best trick in its log: one line when the simulator starts serving a
negative balance, one when the exporter's snapshot (what /metrics serves) has it, with
the seconds between; and it serves this machine only unless told otherwise."""

from __future__ import annotations

import random

import pytest
from support.exporterproc import running
from support.faultkit import captured_logs

from exporter.cli import build_parser, listen_address
from exporter.collectors.cm_account import COLLECTOR as CM
from exporter.collectors.um_account import COLLECTOR as UM
from exporter.demo import NegativeEpisodes
from exporter.simulator.auth import SimAccount
from exporter.simulator.demo import Drift
from exporter.simulator.server import Simulator
from exporter.simulator.virtualtime import EventClock
from exporter.snapshot import AccountSnapshot, AssetBalance, SnapshotStore


def account(negative: float) -> AccountSnapshot:
    usdt = AssetBalance("USDT", {"negativeBalance": negative, "totalWalletBalance": 10.0})
    btc = AssetBalance("BTC", {"negativeBalance": 0.0})
    return AccountSnapshot("desk-a", 10.0, balances=(btc, usdt))


def test_an_episode_is_logged_as_it_starts_and_once_as_the_snapshot_has_it() -> None:
    clock = EventClock(100.0)
    episodes = NegativeEpisodes(clock)
    store = SnapshotStore([account(0.0)])
    with captured_logs() as logs:
        episodes.started("desk-a", "USDT", "15.5")
        clock.time += 0.4
        assert episodes.check(store) is None  # the exporter has not refreshed yet
        store.replace(account(15.5))
        clock.time += 0.35
        seen = episodes.check(store)
        clock.time += 1.0
        assert episodes.check(store) is None  # logged once
    assert seen is not None
    assert (seen.account, seen.asset) == ("desk-a", "USDT")
    events = [{k: v for k, v in e.items() if k != "timestamp"} for e in logs.events()]
    assert events == [
        {
            "event": "demo_negative_episode_started",
            "account": "desk-a",
            "asset": "USDT",
            "negative": "15.5",
            "level": "info",
        },
        {
            "event": "demo_negative_episode_on_metrics",
            "account": "desk-a",
            "asset": "USDT",
            "seconds_after_start": 0.75,
            "level": "info",
        },
    ]


def test_another_assets_negative_balance_is_not_the_episode() -> None:
    episodes = NegativeEpisodes(EventClock(0.0))
    store = SnapshotStore([account(3.0)])  # USDT negative, from before
    episodes.started("desk-a", "BTC", "1")
    assert episodes.check(store) is None
    episodes.started("desk-b", "USDT", "1")  # an account the exporter does not poll
    assert episodes.check(store) is None


class Recorder(NegativeEpisodes):
    """What the simulator served for the episode's asset when the drift announced it."""

    def __init__(self, sim: Simulator) -> None:
        super().__init__()
        self.sim = sim
        self.served: list[tuple[str, str, str, str]] = []

    def started(self, account: str, asset: str, negative: str) -> None:
        (record,) = (r for r in self.sim.balances(account) if r["asset"] == asset)
        self.served.append((account, asset, negative, record["negativeBalance"]))
        super().started(account, asset, negative)


def test_the_drift_announces_each_episode_once_it_serves_it() -> None:
    clock = EventClock(1_700_000_000.0)
    accounts = [SimAccount.hmac(name, f"key-{name}", "secret") for name in ("a", "b", "c")]
    sim = Simulator(accounts, clock=clock)  # not started: data only
    episodes = Recorder(sim)
    drift = Drift(sim, assets_per_account=4, rng=random.Random(7), episodes=episodes)
    starts = 0
    negative_before = False
    for _ in range(400):  # 400 s in 1 s ticks
        clock.time += 1
        drift.tick()
        negative = any(
            r["negativeBalance"] != "0" for name in sim.account_names for r in sim.balances(name)
        )
        starts += negative and not negative_before
        negative_before = negative
    assert starts >= 2
    assert len(episodes.served) == starts
    for _, _, announced, served in episodes.served:
        assert announced == served != "0"


def test_the_drift_moves_the_futures_positions_and_the_exporter_parses_them() -> None:
    clock = EventClock(1_700_000_000.0)
    accounts = [SimAccount.hmac("a", "key-a", "secret")]
    sim = Simulator(accounts, clock=clock)  # not started: data only
    drift = Drift(sim, assets_per_account=4, rng=random.Random(7))
    seen: dict[str, list[tuple[float, ...]]] = {"um": [], "cm": []}
    for _ in range(5):
        clock.time += 1
        drift.tick()
        for book, collector in (("um", UM), ("cm", CM)):
            part = collector.parse(sim.futures_account("a", book))
            assert part.positions
            assert part.assets
            seen[book].append(tuple(p.values["unrealizedProfit"] for p in part.positions))
    for book, profits in seen.items():
        assert len(set(profits)) == len(profits), book  # every tick moves them


@pytest.mark.parametrize(
    ("argv", "environ", "address"),
    [
        (["--demo"], {}, "127.0.0.1:9745"),
        ([], {}, ":9745"),
        (["--demo", "--web.listen-address", ":9745"], {}, ":9745"),
        (["--demo"], {"BINANCE_PM_EXPORTER_WEB_LISTEN_ADDRESS": "[::1]:9"}, "[::1]:9"),
    ],
)
def test_the_demo_listens_on_this_machine_unless_told_otherwise(
    argv: list[str], environ: dict[str, str], address: str
) -> None:
    assert listen_address(build_parser(environ).parse_args(argv)) == address


@pytest.mark.slow
def test_the_demo_process_logs_an_episode_and_when_metrics_has_it() -> None:
    """`binance-pm-exporter --demo` as a user runs it: the first episode starts 5 to 15 s
    in; both lines come, in order, and /metrics has the negative balance meanwhile."""
    with running("--demo") as demo:
        started = demo.logged("demo_negative_episode_started", 40)[0]
        shown = demo.logged("demo_negative_episode_on_metrics", 20)[0]
        text = demo.get("/metrics").text
    assert (shown["account"], shown["asset"]) == (started["account"], started["asset"])
    assert 0 <= shown["seconds_after_start"] < 10  # about a second: the stream's event
    labels = f'account="{started["account"]}",asset="{started["asset"]}"'
    assert f"binance_pm_negative_balance{{{labels}}} {float(started['negative'])}" in text
