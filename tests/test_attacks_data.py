"""Hostile data against the real exporter process (issue 17): what Binance, the user data
stream, the state file and the config's files may hold, and what three bad days do.

The exporter runs as `python -m exporter` (tests/support/exporterproc.py) polling an in-process
simulator, whose admin controls inject what a broken or hostile upstream would send.
Each test asserts that a bad record costs that record only: /metrics stays 200 and
valid for `promtool check metrics`, memory and log lines stay bounded, and the process
stops when told to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.exporterproc import ExporterProcess, black_hole, running
from support.harness import accounts
from support.waits import wait_until
from test_webconfig_reload import write_pair

from exporter.binance.models import MAX_ASSETS_PER_ANSWER
from exporter.labels import LABEL_MAX_CHARS
from exporter.simulator import Simulator
from exporter.simulator.demo import exporter_config
from exporter.storage import FILE_NAME, VERSION
from exporter.watchdog import SHUTDOWN_DEADLINE_SECONDS

pytestmark = [pytest.mark.attack, pytest.mark.timeout(180)]

#: every hostile string of issue 17, each as a label value would get it
HOSTILE = [
    "X\ud800",  # a lone surrogate: not encodable as UTF-8
    "\udfffBTC",
    "BTC\nbinance_pm_up 0",
    "BTC\x00",
    "\x1b[31mBTC",
    "BTC\u202e",
    "A" * (LABEL_MAX_CHARS + 1),
    "S" * 100_000,
    "",
]
BUDGET = {"ip_weight_limit_per_minute": 60000, "share": 1.0, "min_interval_seconds": 1}


def promtool_problems(text: str) -> str:
    """What `promtool check metrics` says of `text` ("" when it is valid)."""
    done = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return (done.stdout + done.stderr).strip() if done.returncode else ""


def assert_metrics_valid(run: ExporterProcess) -> str:
    response = run.get("/metrics")
    assert response.status_code == 200, response.text[:200]
    assert promtool_problems(response.text) == ""
    return response.text


def sample(text: str, prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def scraped(run: ExporterProcess, prefix: str) -> float | None:
    response = run.get("/metrics")
    return sample(response.text, prefix) if response.status_code == 200 else None


def slow_rest_config(sim: Simulator) -> dict[str, Any]:
    """Streams on, REST slow: a round-robin turn every 300 s, a triggered refresh at most
    every 60 s per account; so what the stream brings stays on /metrics meanwhile."""
    budget = {**BUDGET, "min_interval_seconds": 300}
    data = exporter_config(sim.url, GENERATED, budget=budget, stream_url=sim.stream_url)
    data["stream"] = {"min_refresh_interval_seconds": 60}
    return data


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator([g.sim_account for g in GENERATED]) as simulator:
        yield simulator


GENERATED = accounts(2)


# --- #4: one boundary for outside strings --------------------------------------------------


def test_every_label_source_with_every_hostile_string_leaves_metrics_200_and_valid(
    sim: Simulator, tmp_path: Path
) -> None:
    """A lone surrogate in a stream status made every /metrics answer 500 (issue 17, #4)."""
    config = write_config(tmp_path / "config.yaml", slow_rest_config(sim))
    with running("--config.file", str(config)) as run:
        for name in ("acct-00", "acct-01"):
            up = f'binance_pm_stream_up{{account="{name}"}}'
            wait_until(lambda up=up: scraped(run, up) == 1, 30, "the streams up")
        # The stream: a riskLevelChange with each hostile status, then an event of another
        # type; once that one is counted, the others have been read.
        for value in reversed(HOSTILE):  # the lone surrogate last: the one that stays
            frame = {"e": "riskLevelChange", "E": int(time.time() * 1000), "s": value, "u": "1"}
            sim.stream_fault("malformed", account="acct-00", body=json.dumps(frame))
        sim.stream_fault("unknown_event", account="acct-00")
        other = 'binance_pm_stream_events_total{account="acct-00",event="other"}'
        wait_until(lambda: scraped(run, other) == 1, 20, "the marker event counted")
        text = assert_metrics_valid(run)
        rejected = 'binance_pm_stream_frames_rejected_total{account="acct-00"}'
        assert sample(text, rejected) == len(HOSTILE)

        # REST: each hostile asset name next to a good one, and a hostile status.
        good = sim.balances("acct-01")[0]
        sim.set_balances("acct-01", [good, *({**good, "asset": v} for v in HOSTILE)])
        info = dict(sim.account_info("acct-01"))
        sim.set_account_info("acct-01", {**info, "accountStatus": "X\ud800"})
        dropped = 'binance_pm_dropped_records_total{reason="label",source="balance"}'
        wait_until(lambda: (scraped(run, dropped) or 0) >= len(HOSTILE), 20, "a refresh")
        text = assert_metrics_valid(run)
        assert f'account="acct-01",asset="{good["asset"]}"' in text
        assert run.stop() == 0
    assert "Traceback" not in "\n".join(run.lines)


def test_hostile_strings_in_the_state_file_leave_metrics_200_and_valid(tmp_path: Path) -> None:
    balances = [{"asset": v, "values": {"totalWalletBalance": 1.0}} for v in HOSTILE]
    saved = {
        "acct-00": _saved(balances=balances),  # dropped whole
        "acct-01": _saved(info={"values": {"uniMMR": 2.0}, "status": "X\ud800"}),
    }
    saved["acct-00"]["balances"].append({"asset": "BTC", "values": {}})
    storage = tmp_path / "data"
    storage.mkdir()
    (storage / FILE_NAME).write_text(
        json.dumps({"version": VERSION, "written_at": time.time(), "accounts": saved})
    )
    with black_hole() as url:  # no refresh ever completes: what is served is what was saved
        data = exporter_config(url, GENERATED, budget=BUDGET)
        config = write_config(tmp_path / "config.yaml", data)
        with running("--config.file", str(config), "--storage.path", str(storage)) as run:
            text = assert_metrics_valid(run)
            dropped = 'binance_pm_dropped_records_total{reason="label",source="state_file"}'
            assert sample(text, dropped) == 2
            assert len(run.logged("state_accounts_dropped")) == 1
            assert run.stop() == 0


def _saved(**fields: Any) -> dict[str, Any]:
    return {
        "up": True,
        "consecutive_failures": 0,
        "last_success": time.time() - 60,
        "balances": [],
        "info": None,
        **fields,
    }


# --- #7: the state file -----------------------------------------------------------------


@pytest.mark.bench  # times itself: listening within 5 s
def test_a_2_gb_state_file_is_refused_at_once_and_costs_no_memory(tmp_path: Path) -> None:
    """A 2 GB sparse state file was read whole: peak RSS 2.6 GB (issue 17, #7)."""
    storage = tmp_path / "data"
    storage.mkdir()
    with (storage / FILE_NAME).open("wb") as handle:
        handle.truncate(2 * 1024**3)
    with black_hole() as url:
        config = write_config(tmp_path / "config.yaml", exporter_config(url, GENERATED))
        with running("--config.file", str(config), "--storage.path", str(storage)) as run:
            listening = run.listening_at - run.started_at
            peak = run.status("VmHWM")
            (ignored,) = run.events("state_file_ignored")
            assert "too large" in ignored["reason"]
            print(f"2 GB state file: listening after {listening:.2f} s, peak RSS {peak:.0f} MB")
            assert listening < 5.0
            assert peak <= 150
            assert run.stop() == 0


# --- #8: bounded upstream ---------------------------------------------------------------


@pytest.mark.bench  # times itself: CPU seconds a scrape, background work included
def test_100000_assets_in_one_answer_are_capped_with_one_log_line(
    sim: Simulator, tmp_path: Path
) -> None:
    """100,000 assets gave 300,091 series and scrapes of 355 ms to 2.2 s (issue 17, #8)."""
    budget = {**BUDGET, "min_interval_seconds": 5}
    config = write_config(
        tmp_path / "config.yaml", exporter_config(sim.url, GENERATED, budget=budget)
    )
    with running("--config.file", str(config)) as run:
        wait_until(lambda: scraped(run, 'binance_pm_up{account="acct-00"}') == 1, 30)
        junk = [
            {"asset": f"JUNK{i}", "totalWalletBalance": "1.5", "crossMarginFree": "1.5"}
            for i in range(100_000)
        ]
        sim.set_balances("acct-00", junk)
        capped = 'binance_pm_dropped_records_total{reason="over_cap",source="balance"}'
        over = 100_000 - MAX_ASSETS_PER_ANSWER
        wait_until(lambda: (scraped(run, capped) or 0) >= 2 * over, 60, "two capped answers")
        # The simulator shares this process: it stops building 4 MB answers (the exporter
        # keeps the last values of a failing account) so the scrapes are timed alone.
        sim.inject_fault("status", endpoint="/papi/v1/balance", account="acct-00", status=500)
        # Uncompressed: a small gzipped answer on a kept-alive connection waits ~40 ms on
        # Nagle and delayed ACK whatever its size (issue 17, #11: TCP_NODELAY, the HTTP
        # side); what this measures is the cost of the series.
        identity = {"Accept-Encoding": "identity"}
        # A scrape's cost is timed in the exporter's CPU seconds, not wall time: a loaded
        # machine stretches the wall time, not the work (uncapped, rendering 300,091 series
        # took 355 ms to 2.2 s, nearly all of it CPU).
        with httpx.Client(timeout=10, headers=identity) as scraper:
            scraper.get(f"{run.url}/metrics")
            latencies = []
            cpu_before = run.cpu_seconds()
            for _ in range(10):
                started = time.monotonic()
                response = scraper.get(f"{run.url}/metrics")
                latencies.append(time.monotonic() - started)
            cpu = (run.cpu_seconds() - cpu_before) / 10
        assert response.status_code == 200
        served = response.text.count('account="acct-00",asset="JUNK')
        lines = run.events("malformed_records")
        median = statistics.median(latencies)
        print(
            f"100,000 assets: {served} series of acct-00, scrape median {median * 1000:.0f} ms,"
            f" {cpu * 1000:.0f} ms of CPU"
        )
        assert 0 < served <= MAX_ASSETS_PER_ANSWER * 10  # one series per field at most
        assert len(lines) == 1  # one a minute, however many answers
        assert lines[0]["dropped"] == {"over_cap": over}
        assert cpu <= 0.05
        assert run.stop() == 0


# --- #9: event times --------------------------------------------------------------------


@pytest.mark.bench  # times itself: shown within a second
def test_a_margin_call_after_an_event_from_the_future_shows_within_a_second(
    sim: Simulator, tmp_path: Path
) -> None:
    """E = 999999999999999 made every later riskLevelChange look old (issue 17, #9)."""
    config = write_config(tmp_path / "config.yaml", slow_rest_config(sim))
    with running("--config.file", str(config)) as run:
        wait_until(lambda: scraped(run, 'binance_pm_stream_up{account="acct-00"}') == 1, 30)
        wait_until(lambda: scraped(run, 'binance_pm_up{account="acct-00"}') == 1, 30)
        future = {"e": "riskLevelChange", "E": 999999999999999, "s": "REDUCE_ONLY", "u": "2"}
        sim.stream_fault("malformed", account="acct-00", body=json.dumps(future))
        risk = 'binance_pm_stream_events_total{account="acct-00",event="riskLevelChange"}'
        wait_until(lambda: scraped(run, risk) == 1, 20, "the future event read")
        info = dict(sim.account_info("acct-00"))
        started = time.monotonic()
        sim.set_account_info("acct-00", {**info, "accountStatus": "MARGIN_CALL"})
        status = 'binance_pm_account_status{account="acct-00",status="MARGIN_CALL"}'
        wait_until(lambda: scraped(run, status) == 1, 10, "the margin call", step=0.02)
        shown = time.monotonic() - started
        print(f"margin call after a future event: shown after {shown:.3f} s")
        assert shown <= 1.0
        counted = 'binance_pm_stream_future_events_total{account="acct-00"}'
        assert scraped(run, counted) == 1
        assert run.stop() == 0


# --- #5: config and secret files on reload, and shutdown ---------------------------------


def _sparse(path: Path) -> None:
    with path.open("wb") as handle:
        handle.truncate(100 * 1024 * 1024)


#: a secret file swapped for something that is no secret file, and the reason given
BAD_FILES = [
    ("FIFO", os.mkfifo, "not a regular file"),
    ("/dev/zero", lambda p: p.symlink_to("/dev/zero"), "not a regular file"),
    ("100 MB", _sparse, "too large"),
    ("directory", lambda p: p.mkdir(), "directory"),
]


def test_a_fifo_secret_fails_its_reload_at_once_and_sigterm_still_exits(
    sim: Simulator, tmp_path: Path
) -> None:
    """A secret path swapped to a FIFO hung the reload inside open() while it held the
    reload lock: every later reload failed and SIGTERM never exited (issue 17, #5)."""
    data = exporter_config(sim.url, GENERATED, budget=BUDGET)
    secret = tmp_path / "secret"
    secret.write_text(data["accounts"][0].pop("api_secret"))
    data["accounts"][0]["api_secret_file"] = str(secret)
    config = write_config(tmp_path / "config.yaml", data)
    kept = tmp_path / "secret.kept"
    with running("--config.file", str(config)) as run:
        wait_until(lambda: scraped(run, 'binance_pm_up{account="acct-00"}') == 1, 30)
        for bad, swap, reason in BAD_FILES:
            shutil.move(secret, kept)
            swap(secret)
            run.signal(signal.SIGHUP)
            failed = wait_until(lambda: run.events("reload_failed"), 10, f"{bad}: reload failing")
            assert len(failed) == 1, bad
            assert reason in failed[0]["error"], (bad, failed[0]["error"])
            assert scraped(run, "binance_pm_config_last_reload_successful") == 0
            # The lock is free: the next reload runs and succeeds.
            if secret.is_dir():
                secret.rmdir()
            else:
                secret.unlink()
            shutil.move(kept, secret)
            run.signal(signal.SIGHUP)
            wait_until(lambda: run.events("config_reloaded"), 10, f"{bad}: the next reload")
            assert scraped(run, "binance_pm_config_last_reload_successful") == 1
            run.lines.clear()
        # And once more with the FIFO, SIGTERM right behind the SIGHUP.
        secret.unlink()
        os.mkfifo(secret)
        run.signal(signal.SIGHUP)
        run.signal(signal.SIGTERM)
        started = time.monotonic()
        code = run.popen.wait(timeout=30)
        stopped = time.monotonic() - started
        print(f"SIGTERM during a reload of a FIFO secret: exit {code} after {stopped:.2f} s")
        assert stopped < 10.0
        assert code == 0
    assert not run.events("shutdown_stuck")


assert SHUTDOWN_DEADLINE_SECONDS < 10.0  # "SIGTERM exits within 10 s" (README: Security)


def test_sigterm_ends_the_process_within_10_s_while_a_certificate_read_hangs(
    sim: Simulator, tmp_path: Path
) -> None:
    """A certificate that is briefly a FIFO blocked the web config's watcher in open()
    for good, and SIGTERM never exited (issue 17, #5). Now no thread waits on the FIFO
    (the TLS files are read through exporter.safefile), the failed reload is reported,
    and SIGTERM ends the process cleanly within the deadline. (The watchdog, for a read
    stuck elsewhere, is tests/test_watchdog.py's.)"""
    write_pair(tmp_path, "exporter")
    web = tmp_path / "web.yml"
    web.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {
                    "cert_file": str(tmp_path / "server.crt"),
                    "key_file": str(tmp_path / "server.key"),
                }
            }
        )
    )
    config = write_config(
        tmp_path / "config.yaml", exporter_config(sim.url, GENERATED, budget=BUDGET)
    )
    with running("--config.file", str(config), "--web.config.file", str(web)) as run:
        (tmp_path / "server.crt").unlink()
        os.mkfifo(tmp_path / "server.crt")  # no writer, ever
        run.logged("web_config_reload_failed", 15)
        assert not _waits_for_a_fifo(run)
        run.signal(signal.SIGTERM)
        started = time.monotonic()
        code = run.popen.wait(timeout=30)
        stopped = time.monotonic() - started
        stuck = run.events("shutdown_stuck")
        print(f"SIGTERM with a FIFO certificate: exit {code} after {stopped:.2f} s; {stuck}")
        assert stopped < 10.0
        assert code == 0
        assert not stuck


def _waits_for_a_fifo(run: ExporterProcess) -> bool:
    """A thread of the process blocks in open() of a FIFO (the kernel's wait channel)."""
    for task in Path(f"/proc/{run.popen.pid}/task").iterdir():
        try:
            if (task / "wchan").read_text() in ("wait_for_partner", "fifo_open"):
                return True
        except OSError:
            continue
    return False
