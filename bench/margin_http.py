"""/metrics through real HTTP with the margin collectors' positions on (issue 21).

The bundled simulator (in this process, on loopback) serves 200 accounts x 30 assets,
each with a UM book of 20 open positions and a CM book of 5. One exporter process per
mode (`python -m exporter`: margin off, margin on, and with `--tree DIR` main's code,
margin on) polls it, all at the same time: each account every 20 s until all are
refreshed (/readyz), then (a reload, SIGHUP) every 120 s, 1.7 refreshes a second each.
Then, in rounds 1 s apart, each exporter is scraped in turn (text, then gzip with
`Accept-Encoding: gzip`) over its own keep-alive connection: the machine's noise falls
on every mode alike, and ~1.7 of each exporter's accounts change between two of its
scrapes. Figures: the median and p90 scrape time to the last byte, the bodies' size, the
series, and the exporter's RSS after the scrapes (now and peak). The last row is the
physical baseline: the margin-on bytes as two static files, from `python -m http.server`
(HTTP/1.0: a connection per scrape), scraped in the same rounds.

    PYTHONPATH=. python bench/margin_http.py [--tree /work/main] [--scrapes 30]
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _procs import free_port, get, stop, wait_for
from common import median, table
from margin_scrape import _book

from exporter.simulator import Simulator
from exporter.simulator.demo import exporter_config, generate_account

ROOT = Path(__file__).resolve().parents[1]
ACCOUNTS, ASSETS, UM_POSITIONS, CM_POSITIONS = 200, 30, 20, 5
#: each account refreshed every this many seconds until all are (the default budget would
#: take 400 s to fill 200 accounts with w = 50), then every POLL_INTERVAL seconds (a reload)
FILL_INTERVAL, POLL_INTERVAL = 20, 120
#: seconds between two rounds of scrapes: ~1.7 accounts of each exporter change meanwhile
GAP_SECONDS = 1.0


def _status(pid: int) -> dict[str, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def _scrape(
    connection: http.client.HTTPConnection, gzip: bool, static: bool = False
) -> tuple[float, bytes]:
    """One scrape of /metrics (a static server: of the file metrics or metrics.gz): its
    time to the last byte, and the body."""
    headers = {"Accept-Encoding": "gzip"} if gzip else {}
    path = ("/metrics.gz" if gzip else "/metrics") if static else "/metrics"
    started = time.perf_counter()
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    assert response.status == 200, response.status
    assert static or (response.getheader("Content-Encoding") == "gzip") is gzip
    return elapsed, body


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


class Run:
    """One exporter process polling the simulator: its mode, its tree, its figures."""

    def __init__(self, label: str, tree: Path, margin: bool, workdir: Path) -> None:
        self.label, self.margin = label, margin
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tree = tree
        self.process: subprocess.Popen[bytes] | None = None
        self.text: list[float] = []
        self.gzip: list[float] = []
        self.sizes = {"text": 0, "gzip": 0}
        #: a static file server (python -m http.server) of another run's bodies
        self.static = False

    def serve_static(self, text: bytes, gzipped: bytes) -> None:
        """The physical baseline: the same bytes as files, from `python -m http.server`."""
        (self.workdir / "metrics").write_bytes(text)
        (self.workdir / "metrics.gz").write_bytes(gzipped)
        self.static = True
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                "--directory", str(self.workdir), str(self.port),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def configure(self, sim_url: str, generated: list[Any], interval: float) -> Path:
        data = exporter_config(
            sim_url,
            generated,
            budget={
                "ip_weight_limit_per_minute": 1_000_000,
                "share": 1.0,
                "min_interval_seconds": interval,
            },
        )
        data["binance"]["timeout_seconds"] = 10
        data["prices"] = {"enabled": False}
        data["collect"] = {"um_account": self.margin, "cm_account": self.margin}
        config = self.workdir / "config.yaml"
        config.write_text(yaml.safe_dump(data))
        config.chmod(0o600)
        return config

    def start(self, sim_url: str, generated: list[Any]) -> None:
        config = self.configure(sim_url, generated, FILL_INTERVAL)
        log = (self.workdir / "exporter.log").open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "exporter", f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warning",
            ],
            stdout=log, stderr=log, cwd=self.tree,
            env={**os.environ, "PYTHONPATH": str(self.tree)},
        )  # fmt: skip
        log.close()

    def slow_down(self, sim_url: str, generated: list[Any]) -> None:
        """Reload (SIGHUP) with each account every POLL_INTERVAL seconds."""
        assert self.process is not None
        self.configure(sim_url, generated, POLL_INTERVAL)
        self.process.send_signal(signal.SIGHUP)

    def polls_slowly(self) -> bool:
        line = f'binance_pm_refresh_interval_seconds{{account="acct-000"}} {POLL_INTERVAL}'
        return line.encode() in get(f"{self.url}/metrics", timeout=30)

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise SystemExit((self.workdir / "exporter.log").read_text())
        try:
            return get(f"{self.url}/readyz", timeout=5).startswith(b'{"status": "ready"')
        except OSError:
            return False

    def row(self) -> list[str]:
        assert self.process is not None
        memory = _status(self.process.pid)
        if self.static:
            lines = (self.workdir / "metrics").read_bytes().splitlines()
        else:
            lines = get(f"{self.url}/metrics", timeout=30).splitlines()
        return [
            self.label,
            f"{sum(1 for line in lines if line and not line.startswith(b'#')):,}",
            f"{sum(1 for line in lines if b'_position_amount{' in line):,}",
            f"{self.sizes['text'] / 1e6:.2f} MB",
            f"{self.sizes['gzip'] / 1e6:.2f} MB",
            f"{median(self.text) * 1000:.1f} / {_p90(self.text) * 1000:.1f}",
            f"{median(self.gzip) * 1000:.1f} / {_p90(self.gzip) * 1000:.1f}",
            f"{memory['VmRSS']:.1f} / {memory['VmHWM']:.1f}",
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=None, help="main's tree, for 'before'")
    parser.add_argument("--scrapes", type=int, default=30)
    args = parser.parse_args()
    rng = random.Random(21)
    generated = [generate_account(f"acct-{i:03d}", "hmac") for i in range(ACCOUNTS)]
    rows: list[list[str]] = []
    with Simulator(
        [g.sim_account for g in generated], ip_weight_limit=10**6, assets_per_account=ASSETS
    ) as sim:
        for g in generated:
            name = g.sim_account.name
            sim.set_futures_account(name, "um", _book(rng, "um", UM_POSITIONS))
            sim.set_futures_account(name, "cm", _book(rng, "cm", CM_POSITIONS))
        modes = [("main's code, margin on", args.tree, True)] if args.tree else []
        modes += [("this branch, margin off", ROOT, False), ("this branch, margin on", ROOT, True)]
        with tempfile.TemporaryDirectory(prefix="margin-http-") as workdir:
            runs = []
            for index, (label, tree, margin) in enumerate(modes):
                directory = Path(workdir) / str(index)
                directory.mkdir()
                runs.append(Run(label, tree, margin, directory))
            try:
                # all at once, scraped in turn: the machine's noise falls on each alike
                for run in runs:
                    run.start(sim.url, generated)
                started = time.monotonic()
                wait_for(lambda: all(r.ready() for r in runs), 3 * FILL_INTERVAL + 90, "/readyz")
                print(f"every account refreshed after {time.monotonic() - started:.0f} s")
                for run in runs:
                    run.slow_down(sim.url, generated)
                wait_for(lambda: all(r.polls_slowly() for r in runs), 60, "the reloads")
                # the last run's bytes as static files: what serving them costs at the least
                text = _scrape(http.client.HTTPConnection("127.0.0.1", runs[-1].port), False)[1]
                gzipped = _scrape(http.client.HTTPConnection("127.0.0.1", runs[-1].port), True)[1]
                static = Run("static files, margin on's bytes", ROOT, True, Path(workdir) / "s")
                static.workdir.mkdir()
                static.serve_static(text, gzipped)
                wait_for(lambda: get(f"{static.url}/metrics.gz"), 30, "the static server")
                runs.append(static)
                connections = {
                    r.label: http.client.HTTPConnection("127.0.0.1", r.port, timeout=60)
                    for r in runs
                }
                for _ in range(args.scrapes):
                    for gzip in (False, True):
                        time.sleep(GAP_SECONDS / 2)  # the pollers change some accounts
                        for run in runs:
                            elapsed, body = _scrape(connections[run.label], gzip, run.static)
                            (run.gzip if gzip else run.text).append(elapsed)
                            run.sizes["gzip" if gzip else "text"] = len(body)
                for connection in connections.values():
                    connection.close()
                rows = [r.row() for r in runs]
            finally:
                for run in runs:
                    if run.process is not None:
                        stop(run.process)
    print(
        table(
            [
                "run", "series", "positions", "text body", "gzip body",
                "text ms (median / p90)", "gzip ms (median / p90)", "RSS MB (now / peak)",
            ],
            rows,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
