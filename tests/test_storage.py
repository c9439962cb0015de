"""--storage.path: the last snapshot kept across restarts, against the real exporter process."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import structlog.testing
import yaml
from support.exporterproc import black_hole, running
from support.faultkit import captured_logs, hmac_accounts
from support.harness import fast_config
from support.waits import wait_until
from test_secrets import assert_no_secret, make_secrets

from exporter.app import Exporter
from exporter.binance.models import AssetBalance
from exporter.config import Config, load_config
from exporter.simulator import Simulator
from exporter.simulator.transport import SimTransport
from exporter.simulator.virtualtime import EventClock
from exporter.snapshot import AccountSnapshot, Snapshot
from exporter.storage import FILE_NAME, VERSION, Encoder, StateFile, encode

pytestmark = pytest.mark.timeout(120)
#: the exporter as a process of its own, in wall time: what --storage.path does across a
#: restart, and what only a process can show (a file size limit, readiness at start)
process = pytest.mark.slow

NAMES = ["acct-a", "acct-b"]


def write_config(
    path: Path, base_url: str, accounts: list[dict[str, str]], timeout: float = 2.0
) -> Path:
    data = {
        "binance": {"base_url": base_url, "timeout_seconds": timeout},
        "prices": {"base_url": base_url},
        "stream": {"enabled": False},  # no stream server: nothing beyond loopback
        "budget": {"ip_weight_limit_per_minute": 100_000, "share": 1.0, "min_interval_seconds": 1},
        "accounts": accounts,
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, list[dict[str, str]]]]:
    sims, entries = hmac_accounts(NAMES)
    with Simulator(sims, ip_weight_limit=10**6, assets_per_account=3) as simulator:
        yield simulator, entries


def every_second(entries: list[dict[str, str]], timeout: float = 2.0) -> Config:
    """A refresh of every account each second, as `write_config`'s, for the in-process
    simulator."""
    return fast_config("http://sim.test", entries, timeout=timeout)


@pytest.fixture
def sim_in_process(clock: EventClock) -> tuple[Simulator, list[dict[str, str]]]:
    """The simulator on the virtual clock, never started: for `run_in_process`."""
    sims, entries = hmac_accounts(NAMES)
    return Simulator(sims, clock=clock, ip_weight_limit=10**6, assets_per_account=3), entries


def run_in_process(
    storage: Path,
    config: Config,
    sim: Simulator,
    clock: EventClock,
    seconds: float,
    *,
    watch: Callable[[Exporter], Awaitable[None]] | None = None,
) -> Exporter:
    """The exporter with `--storage.path storage` and `config` (any base URL: the simulator
    is in-process), for `seconds` of virtual time, with `watch(exporter)` running beside
    it from the start. It writes a last time on the way out, as on SIGTERM."""
    exporter = Exporter(
        config, clock=clock, transport=SimTransport(sim.state, clock), storage=StateFile(storage)
    )

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(exporter.run(stop))
        watcher = asyncio.create_task(watch(exporter)) if watch is not None else None
        await clock.run_until(clock.now() + seconds)
        stop.set()
        await clock.run(task)  # in-flight requests end on the virtual clock too
        if watcher is not None:
            watcher.cancel()

    asyncio.run(go())
    return exporter


def _values(text: str, names: tuple[str, ...]) -> dict[str, str]:
    """Every sample line of the named families, as text."""
    return {
        line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
        for line in text.splitlines()
        if line.startswith(names)
    }


DATA = (
    "binance_pm_wallet_balance{",
    "binance_pm_negative_balance{",
    "binance_pm_uni_mmr{",
    "binance_pm_account_status{",
    "binance_pm_last_success_timestamp_seconds{",
    "binance_pm_balance_update_timestamp_seconds{",
)


@process
def test_a_restart_serves_the_last_values_and_true_timestamps_at_once(
    sim: tuple[Simulator, list[dict[str, str]]], tmp_path: Path
) -> None:
    simulator, entries = sim
    storage = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml", simulator.url, entries)
    simulator.set_asset("acct-a", "USDT", negativeBalance="12.5")
    with running("--config.file", str(config), "--storage.path", str(storage)) as first:
        wait_until(lambda: first.get("/readyz").status_code == 200, 15, "first run ready")
        wait_until(
            lambda: first.sample("binance_pm_negative_balance", account="acct-a", asset="USDT"),
            15,
            "the negative balance seen",
        )
        shown = _values(first.get("/metrics").text, DATA)
        assert first.stop() == 0
    saved = json.loads((storage / FILE_NAME).read_text())
    assert saved["version"] == VERSION
    assert set(saved["accounts"]) == set(NAMES)
    assert stat.S_IMODE((storage / FILE_NAME).stat().st_mode) == 0o600
    assert [p.name for p in storage.iterdir()] == [FILE_NAME]  # no temporary file left

    # The second run reaches nothing (requests hang), so all it shows is what it restored.
    with black_hole() as nowhere:
        config = write_config(tmp_path / "config.yaml", nowhere, entries, timeout=30)
        with running("--config.file", str(config), "--storage.path", str(storage)) as second:
            assert second.get("/readyz").status_code == 200  # serving what it knows
            text = second.get("/metrics").text
            restored_values = _values(text, DATA)
            # every amount and status as the first run last showed it (the first run may
            # have refreshed once more before its last write: only timestamps can differ)
            assert {k: v for k, v in restored_values.items() if "timestamp" not in k} == {
                k: v for k, v in shown.items() if "timestamp" not in k
            }
            for name in NAMES:
                up = saved["accounts"][name]["up"]  # true unless a refresh failed under load
                assert f'binance_pm_up{{account="{name}"}} {1.0 if up else 0.0}' in text
                last = saved["accounts"][name]["last_success"]
                assert f'binance_pm_last_success_timestamp_seconds{{account="{name}"}} ' in text
                shown = second.sample("binance_pm_last_success_timestamp_seconds", account=name)
                assert shown == last  # the true time, exactly: staleness stays visible
            assert (
                second.sample("binance_pm_negative_balance", account="acct-a", asset="USDT") == 12.5
            )
            restored = second.events("state_restored")
            assert len(restored) == 1
            assert restored[0]["accounts"] == 2
            assert second.stop() == 0


@process
def test_the_first_refresh_replaces_restored_values(
    sim: tuple[Simulator, list[dict[str, str]]], tmp_path: Path
) -> None:
    simulator, entries = sim
    storage = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml", simulator.url, entries)
    args = ("--config.file", str(config), "--storage.path", str(storage))
    with running(*args) as first:
        wait_until(lambda: first.get("/readyz").status_code == 200, 15, "first run ready")
        assert first.stop() == 0
    saved = json.loads((storage / FILE_NAME).read_text())["accounts"]["acct-a"]["last_success"]
    simulator.set_asset("acct-a", "USDT", totalWalletBalance="777.25")
    with running(*args) as second:
        wait_until(
            lambda: (
                (second.sample("binance_pm_last_success_timestamp_seconds", account="acct-a") or 0)
                > saved
            ),
            15,
            "a new refresh",
        )
        assert second.sample("binance_pm_wallet_balance", account="acct-a", asset="USDT") == 777.25
        assert second.stop() == 0


def _snapshot_file(directory: Path, names: list[str], now: float) -> None:
    accounts = {
        name: AccountSnapshot(name, 10.0, up=True, attempted=True, last_success=now - 30)
        for name in names
    }
    directory.mkdir(exist_ok=True)
    (directory / FILE_NAME).write_bytes(encode(Snapshot(accounts), now))


FAULTS: dict[str, Callable[[Path], Any]] = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "garbage": lambda p: p.write_bytes(b"\x00\xffnot json at all\x89PNG"),
    "empty": lambda p: p.write_bytes(b""),
    "newer version": lambda p: p.write_text(
        json.dumps({**json.loads(p.read_text()), "version": VERSION + 1})
    ),
    "wrong shape": lambda p: p.write_text(json.dumps({"version": VERSION, "accounts": [1, 2]})),
    # root reads any file whatever its mode: a directory in its place cannot be read either
    "unreadable": lambda p: (p.unlink(), p.mkdir()),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_state_file_is_logged_once_and_ignored(
    fault: str,
    sim_in_process: tuple[Simulator, list[dict[str, str]]],
    tmp_path: Path,
    clock: EventClock,
) -> None:
    simulator, entries = sim_in_process
    storage = tmp_path / "data"
    _snapshot_file(storage, NAMES, 1.7e9)
    FAULTS[fault](storage / FILE_NAME)
    with captured_logs() as logs:
        exporter = run_in_process(storage, every_second(entries), simulator, clock, 6)
    assert len(logs.events("state_file_ignored")) == 1, logs.lines
    assert "Traceback" not in "\n".join(logs.lines)
    assert exporter.store.current.pending == []  # ready after its refreshes
    assert exporter.store.get("acct-a").up
    assert not logs.events("state_restored")
    if fault != "unreadable":  # the next write replaces the bad file
        assert set(json.loads((storage / FILE_NAME).read_text())["accounts"]) == set(NAMES)


def _file_size_limit() -> None:
    # Writes past 64 bytes fail with EFBIG, as on a full disk; SIGXFSZ would kill the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))


@process  # a file size limit is the process's own: it cannot be set on the test's
def test_a_failed_write_on_a_full_disk_is_logged_and_the_exporter_keeps_serving(
    sim: tuple[Simulator, list[dict[str, str]]], tmp_path: Path
) -> None:
    simulator, entries = sim
    storage = tmp_path / "data"
    storage.mkdir()
    config = write_config(tmp_path / "config.yaml", simulator.url, entries)
    args = ("--config.file", str(config), "--storage.path", str(storage))
    with running(*args, preexec_fn=_file_size_limit) as run:
        run.logged("state_write_failed", 20)
        first = run.sample("binance_pm_last_success_timestamp_seconds", account="acct-a")
        assert first is not None
        wait_until(
            lambda: (
                (run.sample("binance_pm_last_success_timestamp_seconds", account="acct-a") or 0)
                > first
            ),
            15,
            "polling goes on",
        )
        assert run.get("/readyz").status_code == 200
        assert run.stop() == 0  # the last write fails too: still a clean exit
        assert len(run.events("state_write_failed")) == 1  # logged once per kind of failure
    leftovers = [p.name for p in storage.iterdir() if p.name != FILE_NAME]
    assert leftovers == []


def test_a_write_to_a_path_taken_by_a_directory_is_logged_once_and_polling_goes_on(
    sim_in_process: tuple[Simulator, list[dict[str, str]]], tmp_path: Path, clock: EventClock
) -> None:
    """Every write fails, the periodic ones (every 5 s) and the last one on the way out:
    one log line, no temporary file left, and the refreshes go on at their interval."""
    simulator, entries = sim_in_process
    storage = tmp_path / "data"
    storage.mkdir()
    (storage / FILE_NAME).mkdir()
    start = clock.now()
    with captured_logs() as logs:
        exporter = run_in_process(storage, every_second(entries), simulator, clock, 15)
    assert len(logs.events("state_write_failed")) == 1, logs.lines
    assert exporter.store.current.pending == []
    account = exporter.store.get("acct-a")
    assert account.up
    assert account.last_success == start + 14  # every second
    leftovers = [p.name for p in storage.iterdir() if p.name != FILE_NAME]
    assert leftovers == []


def test_readiness_with_a_state_file_is_immediate_for_300_accounts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [f"acct-{i:03d}" for i in range(300)]
    _, entries = hmac_accounts(names)
    storage = tmp_path / "data"
    _snapshot_file(storage, names, 1.7e9)
    with black_hole() as nowhere:
        config = write_config(tmp_path / "config.yaml", nowhere, entries, timeout=30)
        with running("--config.file", str(config), "--storage.path", str(storage)) as run:
            response = run.get("/readyz")
            ready_after = time.monotonic() - run.started_at
            assert response.status_code == 200, response.text
            assert run.logged("state_restored")[0]["accounts"] == 300
            run.stop()
    with capsys.disabled():
        print(f"\n300 accounts restored: /readyz 200 {ready_after:.2f} s after the process start")


def test_readiness_without_a_state_file_waits_for_each_accounts_first_refresh(
    sim_in_process: tuple[Simulator, list[dict[str, str]]], tmp_path: Path, clock: EventClock
) -> None:
    """Requests stall past the 3 s timeout: not ready until each account's first refresh
    has failed (acct-a's starts at once, acct-b's half a 1 s interval later), then ready,
    showing them down: to the virtual tenth of a second."""
    simulator, entries = sim_in_process
    simulator.inject_fault("stall", seconds=60)
    storage = tmp_path / "data"
    start = clock.now()
    pending: list[tuple[float, int]] = []

    async def every_tenth(exporter: Exporter) -> None:
        while True:
            pending.append((round(clock.now() - start, 6), len(exporter.store.current.pending)))
            await clock.sleep(0.1)

    with captured_logs() as logs:
        exporter = run_in_process(
            storage, every_second(entries, timeout=3), simulator, clock, 5, watch=every_tenth
        )
    assert logs.events("state_file_absent")
    assert pending[0] == (0.0, 2)
    assert {n for t, n in pending if t < 3.0} == {2}
    assert {n for t, n in pending if 3.0 < t < 3.5} == {1}
    assert {n for t, n in pending if t > 3.5} == {0}
    assert not exporter.store.get("acct-a").up
    assert not exporter.store.get("acct-b").up


def test_no_secret_in_the_state_file(tmp_path: Path, clock: EventClock) -> None:
    """Keys from the environment and from files, HMAC, RSA and Ed25519 with passphrases:
    the state file keeps the accounts' data, and none of what signs their requests."""
    known = make_secrets(tmp_path, "http://sim.test")
    storage = tmp_path / "data"
    simulator = Simulator(known.sim_accounts, clock=clock, ip_weight_limit=10**6)
    config = load_config(known.config_file, known.environ)
    exporter = run_in_process(storage, config, simulator, clock, 3)
    assert all(exporter.store.get(name).up for name in ("hmac", "rsa", "ed"))
    state = (storage / FILE_NAME).read_text()
    assert set(json.loads(state)["accounts"]) == {"hmac", "rsa", "ed"}
    assert_no_secret(state, "the state file", known.forms)
    for forbidden in ("api_key", "secret", "proxy", "private"):
        assert forbidden not in state


def test_the_encoder_reuses_unchanged_accounts_and_equals_a_fresh_encoding() -> None:
    balances = (AssetBalance("USDT", MappingProxyType({"negativeBalance": 0.1 + 0.2}), 1.5),)
    accounts = {
        name: AccountSnapshot(name, 10.0, balances, up=True, attempted=True, last_success=1.0)
        for name in NAMES
    }
    encoder = Encoder()
    first = encoder(Snapshot(accounts), 5.0)
    assert first == encode(Snapshot(accounts), 5.0)
    accounts["acct-b"] = replace(accounts["acct-b"], last_success=2.0, up=False)
    second = encoder(Snapshot(accounts, 1), 6.0)
    assert second == encode(Snapshot(accounts, 1), 6.0)
    saved = json.loads(second)["accounts"]
    assert saved["acct-b"]["last_success"] == 2.0
    # amounts exactly as held: the float read back is the float written
    assert saved["acct-a"]["balances"][0]["values"]["negativeBalance"] == 0.1 + 0.2


def test_an_older_snapshot_never_overwrites_a_newer_one(tmp_path: Path) -> None:
    state = StateFile(tmp_path)
    older = Snapshot({"acct-a": AccountSnapshot("acct-a", 1.0, attempted=True)}, 1)
    newer = Snapshot({"acct-a": AccountSnapshot("acct-a", 1.0, attempted=True, up=True)}, 2)
    assert state.write(newer, 2.0)
    assert state.write(older, 3.0)  # a slow write from the loop, finishing after shutdown's
    assert json.loads((tmp_path / FILE_NAME).read_text())["accounts"]["acct-a"]["up"] is True


# --- a hostile or damaged state file (issue 17) ------------------------------------------


def _saved(**account: Any) -> dict[str, Any]:
    record = {
        "up": True,
        "consecutive_failures": 0,
        "last_success": 1.7e9,
        "balances": [{"asset": "BTC", "values": {"totalWalletBalance": 1.0}}],
        "info": {"values": {"uniMMR": 3.0}, "status": "NORMAL"},
    }
    return {**record, **account}


def _write_state(directory: Path, accounts: dict[str, Any], mode: int = 0o600) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / FILE_NAME
    path.write_text(json.dumps({"version": VERSION, "written_at": 1.7e9, "accounts": accounts}))
    path.chmod(mode)
    return path


BAD_ACCOUNTS: dict[str, tuple[dict[str, Any], str]] = {
    "duplicate assets": (
        {"balances": [{"asset": "BTC", "values": {}}, {"asset": "BTC", "values": {}}]},
        "duplicate",
    ),
    "empty asset": ({"balances": [{"asset": "", "values": {}}]}, "label"),
    "lone surrogate asset": ({"balances": [{"asset": "X\ud800", "values": {}}]}, "label"),
    "newline in asset": ({"balances": [{"asset": "A\nB", "values": {}}]}, "label"),
    "overlong status": ({"info": {"values": {}, "status": "S" * 1000}}, "label"),
    "control in status": ({"info": {"values": {}, "status": "NORMAL\x1b"}}, "label"),
    "last success in 9999": ({"last_success": 253402300799.0}, "out_of_range"),
    "update time in 9999": (
        {"balances": [{"asset": "BTC", "values": {}, "update_time": 253402300799.0}]},
        "out_of_range",
    ),
    "negative time": ({"last_success": -1.0}, "out_of_range"),
    "2**62 failures": ({"consecutive_failures": 2**62}, "out_of_range"),
    "negative failures": ({"consecutive_failures": -1}, "out_of_range"),
    "6000 assets": (
        {"balances": [{"asset": f"A{i}", "values": {}} for i in range(6000)]},
        "over_cap",
    ),
    "wrong shape": ({"balances": "BTC"}, "malformed"),
}


@pytest.mark.parametrize("bad", list(BAD_ACCOUNTS))
def test_a_bad_saved_account_is_dropped_and_the_others_restored(bad: str, tmp_path: Path) -> None:
    fields, reason = BAD_ACCOUNTS[bad]
    _write_state(tmp_path, {"acct-a": _saved(**fields), "acct-b": _saved()})
    state = StateFile(tmp_path)
    with structlog.testing.capture_logs() as logs:
        restored = state.load(NAMES)
    assert list(restored) == ["acct-b"]
    assert state.dropped == {reason: 1}
    (line,) = [e for e in logs if e["event"] == "state_accounts_dropped"]
    assert line["problems"][0].startswith("acct-a: ")
    assert "\ud800" not in str(line)


def test_unknown_accounts_are_dropped_before_their_contents_are_looked_at(
    tmp_path: Path,
) -> None:
    _write_state(tmp_path, {"acct-a": _saved(), "gone": {"balances": "anything at all"}})
    state = StateFile(tmp_path)
    assert list(state.load(NAMES)) == ["acct-a"]
    assert state.dropped == {}


def test_a_stale_temporary_file_is_removed_at_start(tmp_path: Path) -> None:
    _write_state(tmp_path, {"acct-a": _saved()})
    stale = tmp_path / f".{FILE_NAME}.k1l2e3d4.tmp"
    stale.write_bytes(b"x" * 10_000_000)
    other = tmp_path / "notes.tmp"
    other.write_text("not ours")
    assert list(StateFile(tmp_path).load(NAMES)) == ["acct-a"]
    assert not stale.exists()
    assert other.exists()


@pytest.mark.parametrize("who", ["world-writable", "foreign-owned"])
def test_a_state_file_others_control_is_refused_with_one_line(who: str, tmp_path: Path) -> None:
    path = _write_state(tmp_path, {"acct-a": _saved()}, 0o666 if who == "world-writable" else 0o600)
    if who == "foreign-owned":
        if os.geteuid() != 0:
            pytest.skip("only root can give a file away")
        os.chown(path, 4242, 4242)
    with structlog.testing.capture_logs() as logs:
        assert StateFile(tmp_path).load(NAMES) == {}
    (line,) = [e for e in logs if e["event"] == "state_file_ignored"]
    assert ("others" if who == "world-writable" else "another user") in line["reason"]


def test_a_group_writable_state_file_is_read_as_kubernetes_fsgroup_makes_it(
    tmp_path: Path,
) -> None:
    _write_state(tmp_path, {"acct-a": _saved()}, 0o660)
    assert list(StateFile(tmp_path).load(NAMES)) == ["acct-a"]


def test_a_state_file_over_the_cap_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    with path.open("wb") as handle:
        handle.truncate(2 * 1024**3)  # sparse: 2 GB that cost no disk
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        assert StateFile(tmp_path).load(NAMES) == {}
    assert time.monotonic() - started < 1.0
    (line,) = [e for e in logs if e["event"] == "state_file_ignored"]
    assert "too large" in line["reason"]


# --- the format on disk ---------------------------------------------------------------------


def test_a_state_file_of_the_first_format_still_loads(tmp_path: Path) -> None:
    # written by the storage of the exporter before the collectors decoded their own parts
    # (tests/fixtures/state_v1.json): balances and info at the record's own keys
    from exporter.collectors.um_account import COLLECTOR as UM  # noqa: PLC0415

    fixture = Path(__file__).parent / "fixtures" / "state_v1.json"
    tmp_path.joinpath(FILE_NAME).write_bytes(fixture.read_bytes())
    tmp_path.joinpath(FILE_NAME).chmod(0o600)
    state = StateFile(tmp_path)
    restored = state.load(NAMES, refresh_interval=7.0)
    assert state.dropped == {}
    a, b = restored["acct-a"], restored["acct-b"]
    assert (a.up, a.restored, a.last_success) == (True, True, 1700000100.25)
    assert a.refresh_interval == 7.0
    assert [(x.asset, dict(x.values), x.update_time) for x in a.balances] == [
        ("BTC", {"totalWalletBalance": 0.1 + 0.2, "negativeBalance": 0.0}, 1700000000.5),
        ("USDT", {"totalWalletBalance": 1234.5}, None),
    ]
    assert a.info is not None
    assert (dict(a.info.values), a.info.status, a.info.update_time) == (
        {"uniMMR": 3.25, "accountEquity": 10000.0},
        "NORMAL",
        1700000050.0,
    )
    um = UM.get(a)
    assert um is not None
    assert [(x.asset, dict(x.values)) for x in um.assets] == [
        ("USDT", {"crossWalletBalance": 1000.5, "maintMargin": 12.5})
    ]
    assert [(p.symbol, p.side, p.values["leverage"], p.update_time) for p in um.positions] == [
        ("BTCUSDT", "BOTH", 20.0, 1700000001.0)
    ]
    assert (b.up, b.consecutive_failures, b.balances, b.info, b.parts) == (False, 3, (), None, {})
    # and what it writes back is the same file, but for the time it was written
    rewritten = json.loads(encode(Snapshot(restored), 1700000200.0))
    assert rewritten == json.loads(fixture.read_text())
