"""Load: wrk drives /metrics while the exporter polls many simulated accounts.

    python bench/load.py [--accounts 100] [--assets 20] [--interval 5] [--duration 60]
                         [--connections 64] [--threads 2] [--baseline 30] [--json out.json]
                         [--tree CHECKOUT]

The simulator and the exporter run as processes (`python -m exporter.simulator
--write-config`, `python -m exporter`); the budget is opened wide (IP limit 1,000,000,
share 1) so every account is refreshed each `--interval` seconds. After a quiet
baseline window, wrk hammers /metrics. Reported: wrk's requests/s, latency percentiles
and errors, and the refresh schedule in both windows, from the simulator's request log:
the gaps between two refreshes of one account, and each refresh's lateness against the
cadence the account had before the window (its last refresh before it + k x interval).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from _procs import (
    cpu_seconds,
    get,
    percentile,
    rss_mib,
    series,
    sim_requests,
    start_exporter,
    start_simulator,
    stop,
    tune_config,
    use_tree,
    wait_for,
)


def schedule(
    records: list[dict[str, Any]], start: float, end: float, interval: float, accounts: int
) -> dict[str, Any]:
    """Refresh timing in [start, end). Each account's cadence is anchored on its last
    refresh before `start`: the k-th refresh in the window is due at anchor + k x interval,
    and its lateness is how much later it came (a skipped turn counts a whole interval).
    An account not refreshed at all in the window counts as late by end - its first due."""
    before: dict[str, float] = {}
    inside: dict[str, list[float]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r["time"]):
        if r["path"] != "/papi/v1/balance" or not r["account"]:
            continue
        if r["time"] < start:
            before[r["account"]] = r["time"]
        elif r["time"] < end:
            inside[r["account"]].append(r["time"])
    gaps, late, behind = [], [], []
    for account in before.keys() | inside.keys():
        times = inside.get(account, [])
        anchor = before.get(account, times[0] - interval if times else start)
        gaps += [b - a for a, b in itertools.pairwise([anchor, *times])]
        late += [t - (anchor + k * interval) for k, t in enumerate(times, 1)]
        # how far behind its cadence the account is when the window ends
        due = anchor + (len(times) + 1) * interval
        behind.append(max(0.0, end - due))
    refreshes = sum(len(t) for t in inside.values())
    return {
        "seconds": round(end - start, 1),
        "refreshes": refreshes,
        "expected": round(accounts * (end - start) / interval),
        "accounts_refreshed": len(inside),
        "gap_p50": percentile(gaps, 50),
        "gap_p99": percentile(gaps, 99),
        "gap_max": max(gaps, default=float("nan")),
        "late_p50": percentile(late, 50),
        "late_p99": percentile(late, 99),
        "late_max": max(late, default=float("nan")),
        "behind_at_end_max": max(behind, default=float("nan")),
        "behind_at_end_mean": sum(behind) / len(behind) if behind else float("nan"),
    }


def log_events(path: Path) -> dict[str, int]:
    """The exporter's warnings, counted by event and outcome."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        counts[":".join(str(event[k]) for k in ("event", "outcome") if k in event)] += 1
    return dict(counts)


def run_wrk(wrk: str | None, url: str, args: argparse.Namespace) -> str:
    assert wrk is not None
    command = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s"]
    command += ["--timeout", "30s", "--latency", f"{url}/metrics"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def steady_scrapes(url: str, every: float, duration: float) -> tuple[str, dict[str, Any]]:
    """One scrape every `every` seconds (or back to back if a scrape takes longer)."""
    latencies, errors = [], 0
    end = time.monotonic() + duration
    next_at = time.monotonic()
    while next_at < end:
        time.sleep(max(0.0, next_at - time.monotonic()))
        started = time.monotonic()
        try:
            get(url)
        except OSError:
            errors += 1
        latencies.append(time.monotonic() - started)
        next_at += every
    figures = {
        "requests": len(latencies),
        "errors": errors,
        "latency_seconds": {q: percentile(latencies, q) for q in (50, 75, 90, 99)},
    }
    return json.dumps(figures), figures


def parse_wrk(text: str) -> dict[str, Any]:
    def number(pattern: str) -> float:
        match = re.search(pattern, text)
        return float(match.group(1)) if match else 0.0

    def seconds(value: str, unit: str) -> float:
        return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]

    latency = {
        q: seconds(v, u)
        for q, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
    }
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return {
        "requests": int(number(r"(\d+) requests in")),
        "requests_per_second": number(r"Requests/sec:\s+([\d.]+)"),
        "latency_seconds": latency,
        "non_2xx": int(number(r"Non-2xx or 3xx responses: (\d+)")),
        "socket_errors": dict(
            zip(
                ("connect", "read", "write", "timeout"),
                map(int, socket_errors.groups()),
                strict=True,
            )
        )
        if socket_errors
        else {"connect": 0, "read": 0, "write": 0, "timeout": 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--assets", type=int, default=20)
    parser.add_argument("--interval", type=float, default=5.0, help="min_interval_seconds")
    parser.add_argument("--duration", type=int, default=60, help="wrk seconds")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", type=float, default=30.0, help="quiet seconds first")
    parser.add_argument(
        "--scrape-every",
        type=float,
        metavar="SECONDS",
        help="instead of wrk, one scraper at this steady pace (a Prometheus-like load)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--tree", type=Path, help="run the exporter's code from this checkout")
    args = parser.parse_args()
    if args.tree is not None:
        use_tree(args.tree)
    wrk = shutil.which("wrk")
    if wrk is None and not args.scrape_every:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        workdir = Path(tmp)
        sim, sim_url, config = start_simulator(
            workdir, accounts=args.accounts, assets=args.assets, ip_weight_limit=1_000_000
        )
        exporter = None
        try:
            tune_config(config, share=1.0, ip_high_water=0.9, min_interval_seconds=args.interval)
            exporter, url = start_exporter(config, workdir)
            time.sleep(args.interval)  # every account on its cadence before measuring
            before = get(f"{url}/metrics")
            cpu0, base0 = cpu_seconds(exporter.pid), time.time()
            time.sleep(args.baseline)
            load0 = time.time()
            cpu1 = cpu_seconds(exporter.pid)
            if args.scrape_every:
                out, load = steady_scrapes(f"{url}/metrics", args.scrape_every, args.duration)
            else:
                out = run_wrk(wrk, url, args)
                load = parse_wrk(out)
            load1 = time.time()
            cpu2 = cpu_seconds(exporter.pid)
            rss = rss_mib(exporter.pid)
            # wrk's last requests may still hold every /metrics slot for a moment (503)
            after = wait_for(lambda: get(f"{url}/metrics"), 30, "/metrics after it").decode()
            records = sim_requests(sim_url)
        finally:
            if exporter is not None:
                stop(exporter)
            stop(sim)
        events = log_events(workdir / "exporter.log")

    up = [line for line in after.splitlines() if line.startswith("binance_pm_up{")]
    report = {
        "setup": {
            "accounts": args.accounts,
            "assets": args.assets,
            "interval_seconds": args.interval,
            "load": f"one scrape every {args.scrape_every} s for {args.duration} s"
            if args.scrape_every
            else f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s",
            "series": len(series(after)),
            "metrics_bytes": len(before),
            "tree": str(args.tree or "this one"),
        },
        "scrapes": load,
        "schedule_baseline": schedule(records, base0, load0, args.interval, args.accounts),
        "schedule_under_load": schedule(records, load0, load1, args.interval, args.accounts),
        "exporter": {
            "rss_mib": round(rss, 1),
            "cpu_baseline": round((cpu1 - cpu0) / (load0 - base0), 2),
            "cpu_under_load": round((cpu2 - cpu1) / (load1 - load0), 2),
            "accounts_up": sum(line.endswith(" 1.0") for line in up),
            "log_events": events,
        },
    }
    print(out)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
