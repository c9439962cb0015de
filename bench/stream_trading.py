"""Danger first on a desk that trades (issue 16), on real time: the simulator in this
process, trading at 0, 5 and 50 fills a second across 200 accounts; the exporter a process
of its own on the default budget (B = 1500), once with this tree's code and once with
another tree's (`--before`, e.g. main's) in the same run. Figures:

1. Freshness: 20 negative balances on random accounts, one after the other, each 2-3 s
   after the previous one showed: change -> the value on /metrics (timeout 15 s).
2. Margin call: 5 riskLevelChanges on random accounts, with the trading on -> the status
   on /metrics.
3. One change, one refresh (quiet desk): 10 fills on accounts whose turns are far, and
   the requests their two events cost in the simulator's request log.
4. Cost: the exporter's CPU (user + system, /proc) per 1,000 stream events at 50 fills/s,
   and as a share of one core.

    PYTHONPATH=. python bench/stream_trading.py --before /tmp/main-tree   # ~15 min
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from _procs import free_port, get, stop, wait_for
from common import ROOT, table

from exporter.simulator import Simulator
from exporter.simulator.cli import write_config
from exporter.simulator.demo import account_name, exporter_config, generate_account
from exporter.simulator.trading import start_trading

ACCOUNTS = 200
TRIES = 20
TIMEOUT = 15.0


class Exporter:
    """`python -m exporter` from the tree `code`, on `config`."""

    def __init__(self, code: Path, config: Path, work: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        log = (work / f"exporter-{code.name}.log").open("wb")
        env = {**os.environ, "PYTHONPATH": str(code), "PYTHONDONTWRITEBYTECODE": "1"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                f"--config.file={config}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warning",
            ],
            stdout=log,
            stderr=log,
            env=env,
            cwd=code,
        )
        log.close()

    def metrics(self) -> dict[str, float]:
        samples = {}
        for line in get(f"{self.url}/metrics", timeout=10).decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def events(self) -> float:
        return sum(
            v for k, v in self.metrics().items() if k.startswith("binance_pm_stream_events_total")
        )


def series(name: str, **labels: str) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def shows(exporter: Exporter, key: str, value: float, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if exporter.metrics().get(key) == value:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.02)
    return None


def freshness(sim: Simulator, exporter: Exporter, rng: random.Random, tries: int) -> list[float]:
    delays = []
    for attempt, name in enumerate(rng.sample(sim.account_names, tries)):
        time.sleep(rng.uniform(2.0, 3.0))
        asset = sim.balances(name)[0]["asset"]
        value = 100.0 + attempt
        key = series("binance_pm_negative_balance", account=name, asset=asset)
        began = time.monotonic()
        sim.set_asset(name, asset, negativeBalance=str(value))
        shown = shows(exporter, key, value, TIMEOUT)
        delays.append(TIMEOUT if shown is None else time.monotonic() - began)
    return delays


def margin_calls(sim: Simulator, exporter: Exporter, rng: random.Random) -> list[float]:
    delays = []
    for name in rng.sample(sim.account_names, 5):
        time.sleep(rng.uniform(2.0, 3.0))
        info = {**sim.account_info(name), "accountStatus": "MARGIN_CALL", "uniMMR": "1.25"}
        key = series("binance_pm_account_status", account=name, status="MARGIN_CALL")
        began = time.monotonic()
        sim.set_account_info(name, info)
        shown = shows(exporter, key, 1.0, TIMEOUT)
        delays.append(TIMEOUT if shown is None else time.monotonic() - began)
    return delays


def one_change(sim: Simulator, exporter: Exporter, fills: int = 10) -> tuple[int, int, int]:
    """(fills, requests, weight) for `fills` fills, 3.5 s apart (slower than main's B/2
    pays for one 40-weight refresh), on distinct accounts whose turns are far: what their
    two events each cost in the simulator's request log."""
    names = sim.account_names[ACCOUNTS // 2 : ACCOUNTS // 2 + fills]
    before = len(sim.requests)
    for name in names:
        asset = sim.balances(name)[0]["asset"]
        sim.state.book.trade(name, asset, Decimal("1.5"), Decimal("0.25"))
        time.sleep(3.5)
    time.sleep(5)  # a second event's "one more after it" would come 2 s after the first
    reads = [
        r
        for r in sim.requests[before:]
        if r.account in names and r.path in ("/papi/v1/balance", "/papi/v1/account")
    ]
    return fills, len(reads), sum(r.weight for r in reads)


def cost(exporter: Exporter, seconds: float = 30.0) -> tuple[float, float]:
    """(CPU ms per 1,000 events, % of one core) over `seconds`."""
    cpu, events, began = exporter.cpu_seconds(), exporter.events(), time.monotonic()
    time.sleep(seconds)
    cpu = exporter.cpu_seconds() - cpu
    events = exporter.events() - events
    return cpu / max(events, 1) * 1000 * 1000, cpu / (time.monotonic() - began) * 100


def run(code: Path, rate: float, work: Path, tries: int) -> dict[str, object]:
    generated = [
        generate_account(account_name("sim-", i, ACCOUNTS), "hmac") for i in range(ACCOUNTS)
    ]
    figures: dict[str, object] = {}
    with Simulator([g.sim_account for g in generated], assets_per_account=4) as sim:
        config = work / f"config-{code.name}-{rate}.yaml"
        write_config(config, exporter_config(sim.url, generated, stream_url=sim.stream_url))
        exporter = Exporter(code, config, work)
        try:
            up = [series("binance_pm_stream_up", account=n) for n in sim.account_names]
            wait_for(lambda: all(exporter.metrics().get(k) == 1 for k in up), 180, "200 streams")
            if rate:
                start_trading(sim, rate, seed=7)
            rng = random.Random(9)
            if rate == 0:
                figures["one change"] = one_change(sim, exporter)
            if tries:
                figures["freshness"] = freshness(sim, exporter, rng, tries)
            if rate == 5:
                figures["margin call"] = margin_calls(sim, exporter, rng)
            if rate == 50:
                figures["cost"] = cost(exporter)
        finally:
            stop(exporter.process)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True, help="the tree to compare with")
    parser.add_argument("--rates", default="0,5,50")
    parser.add_argument("--tries", type=int, default=TRIES, help="tries per rate (after)")
    parser.add_argument("--before-tries", type=int, default=10, help="tries per rate (before)")
    parser.add_argument("--only-after", action="store_true")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    rows, others = [], []
    with tempfile.TemporaryDirectory() as tmp:
        codes = [("before", args.before.resolve(), args.before_tries), ("after", ROOT, args.tries)]
        for label, code, tries in codes[1:] if args.only_after else codes:
            for rate in rates:
                figures = run(code, rate, Path(tmp), tries)
                delays = figures.get("freshness")
                if isinstance(delays, list):
                    late = sum(d >= TIMEOUT for d in delays)
                    rows.append(
                        (label, f"{rate:g}/s", statistics.median(delays), max(delays), late)
                    )
                    print(label, rate, [round(d, 2) for d in delays], flush=True)
                for key in ("one change", "margin call", "cost"):
                    if key in figures:
                        others.append((label, f"{rate:g}/s", key, figures[key]))
                        print(label, rate, key, figures[key], flush=True)
    print()
    print(
        table(
            ["code", "fills", "negative -> /metrics median (s)", "worst (s)", f">= {TIMEOUT:g} s"],
            rows,
        )
    )
    for row in others:
        print(*row)


if __name__ == "__main__":
    main()
