"""The command line as a user runs it: a subprocess with flags and environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from support.harness import accounts
from support.waits import wait_until

import exporter
from exporter.simulator import Simulator

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def sim_config(tmp_path: Path) -> Iterator[tuple[Simulator, Path]]:
    generated = accounts(2, ("hmac", "ed25519"))
    with Simulator([g.sim_account for g in generated]) as sim:
        path = tmp_path / "config.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "binance": {"base_url": sim.url},
                    "stream": {"enabled": False},  # no stream server: nothing beyond loopback
                    "prices": {"base_url": sim.url},
                    "budget": {"min_interval_seconds": 1},
                    "accounts": [dict(g.config) for g in generated],
                }
            )
        )
        yield sim, path


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"binance-pm-exporter {exporter.__version__}"


def test_check_config_prints_a_summary_and_exits_0(sim_config) -> None:
    _, path = sim_config
    result = run_cli("--check-config", "--config.file", str(path))
    assert result.returncode == 0, result.stderr
    assert "acct-00  hmac" in result.stdout
    assert "acct-01  ed25519" in result.stdout
    assert "B = 6000 x 0.25 = 1500 weight/min" in result.stdout


def test_check_config_shows_the_documented_stream_url_for_the_sdks_one(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "binance": {"stream_url": "wss://fstream.binance.com/pm"},
                "accounts": [{"name": "desk", "api_key": "k", "api_secret": "s"}],
            }
        )
    )
    result = run_cli("--check-config", "--config.file", str(path))
    assert result.returncode == 0, result.stderr
    assert "stream: wss://fstream.binance.com/pm/ws/<listenKey>" in result.stdout
    assert (
        "time: GET https://fapi.binance.com/fapi/v1/time, else GET"
        " https://api.binance.com/api/v3/time" in result.stdout
    )


def test_flags_come_from_the_environment_and_the_flag_wins(sim_config, tmp_path) -> None:
    _, path = sim_config
    env = {"BINANCE_PM_EXPORTER_CONFIG_FILE": str(path), "BINANCE_PM_EXPORTER_CHECK_CONFIG": "1"}
    assert run_cli(env=env).returncode == 0
    missing = str(tmp_path / "missing.yaml")
    result = run_cli("--config.file", missing, env=env)
    assert result.returncode == 2


def test_a_bad_config_gives_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "budget:\n  share: 1.5\naccounts:\n  - name: a\n    api_key: k\n    api_secret: hunter2\n"
    )
    result = run_cli("--config.file", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "budget.share" in lines[0]
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr


def test_bad_listen_address_and_web_config_exit_2(sim_config, tmp_path) -> None:
    _, path = sim_config
    result = run_cli("--config.file", str(path), "--web.listen-address", "nope")
    assert result.returncode == 2
    assert "--web.listen-address" in result.stderr
    bad = tmp_path / "web.yml"
    bad.write_text("basic_auth_users: 3\n")
    result = run_cli("--config.file", str(path), "--web.config.file", str(bad))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def _start(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "--web.listen-address",
            "127.0.0.1:0",
            "--log.format",
            "json",
            *args,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if '"listening"' in line:
            address = line.split('"address": "')[1].split('"')[0]
            return process, f"http://{address}"
    process.kill()
    raise AssertionError("the exporter never said it was listening")


def test_runs_serves_and_stops_cleanly_on_sigterm(sim_config) -> None:
    _, path = sim_config
    process, url = _start("--config.file", str(path))
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout=15)
        text = httpx.get(f"{url}/metrics").text
        assert 'binance_pm_up{account="acct-00"} 1.0' in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
    _, err = process.communicate()
    assert '"stopped"' in err


#: the exporter, sending itself the signals named in argv[1] the moment it logs that it
#: listens: before its loop runs, when a signal once took its default action
SIGNALLED_AT_LISTENING = """
import os, signal, sys
from exporter import cli
logger = cli.log
class Log:
    def __getattr__(self, name):
        return getattr(logger, name)
    def info(self, event, **fields):
        logger.info(event, **fields)
        if event == "listening":
            for name in sys.argv[1].split(","):
                os.kill(os.getpid(), getattr(signal, name))
cli.log = Log()
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("signals", ["SIGTERM", "SIGINT", "SIGHUP,SIGTERM"])
def test_a_signal_right_after_listening_is_held_until_the_loop_runs(
    sim_config: tuple[Simulator, Path], signals: str
) -> None:
    """A stop signal there stops cleanly (exit 0), a SIGHUP reloads: by their default
    actions the process died (exit -15, -2, -1) with nothing saved or said."""
    _, path = sim_config
    flags = ["--config.file", str(path), "--web.listen-address", "127.0.0.1:0", "--log.format"]
    result = subprocess.run(
        [sys.executable, "-c", SIGNALLED_AT_LISTENING, signals, *flags, "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"stopped"' in result.stderr
    assert ('"reload_requested"' in result.stderr) == ("SIGHUP" in signals)


def test_demo_mode_serves_live_metrics_within_seconds() -> None:
    """The first account's data, as soon as it is refreshed: the demo's three accounts
    take turns 10 s / 3 apart, so waiting for the last would wait for the schedule (every
    key type signing is test_exporter's; the demo's streams, test_stream_wiring's)."""
    process, url = _start("--demo")
    try:

        def first_shown() -> str | None:
            text = httpx.get(f"{url}/metrics").text
            # a fill's event may read the balance alone first: wait for the account's too
            shown = 'binance_pm_uni_mmr{account="desk-a"}' in text
            return text if shown and 'binance_pm_up{account="desk-a"} 1.0' in text else None

        text = wait_until(first_shown, timeout=15)
        assert 'binance_pm_wallet_balance{account="desk-a",' in text
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.communicate()
