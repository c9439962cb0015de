"""Soak: at least 20,000 account refreshes while assets appear and disappear.

    python bench/soak.py [--accounts 100] [--assets 8] [--interval 1] [--refreshes 20000]
                         [--churn-every 0.05] [--json out.json]

The simulator and the exporter run as processes, every account refreshed each
`--interval` s. A churn thread adds assets with fresh names (SOAK1, SOAK2, ...) to
random accounts and removes them again through the simulator's admin API, so label
values keep changing. Every 10 s it samples the exporter's resident memory (VmRSS) and
series count. At the end every churned asset is removed; the series count must come
back to where it started (no leftover series), and memory must not have grown beyond
noise.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _procs import (
    get,
    rss_mib,
    send,
    series,
    start_exporter,
    start_simulator,
    stop,
    tune_config,
    wait_for,
)


class Churn:
    """Adds and removes assets on random accounts through the simulator's admin API."""

    def __init__(self, sim_url: str, accounts: list[str], every: float, seed: int = 1) -> None:
        self.sim_url = sim_url
        self.accounts = accounts
        self.every = every
        self.rng = random.Random(seed)
        self.live: dict[str, set[str]] = {a: set() for a in accounts}
        self.added = self.removed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            account = self.rng.choice(self.accounts)
            live = self.live[account]
            if live and (len(live) >= 4 or self.rng.random() < 0.5):
                self.remove(account, self.rng.choice(sorted(live)))
            else:
                self.added += 1
                asset = f"SOAK{self.added}"
                fields = {"totalWalletBalance": f"{self.rng.uniform(0, 1e4):.8f}"}
                send("PATCH", f"{self.sim_url}/_sim/assets/{account}/{asset}", fields)
                live.add(asset)

    def remove(self, account: str, asset: str) -> None:
        send("DELETE", f"{self.sim_url}/_sim/assets/{account}/{asset}")
        self.live[account].discard(asset)
        self.removed += 1

    def remove_all(self) -> None:
        for account, live in self.live.items():
            for asset in sorted(live):
                self.remove(account, asset)


def counter(metrics_text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} "
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            total += float(line[len(prefix) :])
    return total


def failures(metrics_text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("binance_pm_requests_total{") and 'outcome="success"' not in line
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--assets", type=int, default=8)
    parser.add_argument("--interval", type=float, default=1.0, help="min_interval_seconds")
    parser.add_argument("--refreshes", type=int, default=20_000)
    parser.add_argument("--churn-every", type=float, default=0.05, help="seconds per change")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        workdir = Path(tmp)
        sim, sim_url, config = start_simulator(
            workdir, accounts=args.accounts, assets=args.assets, ip_weight_limit=10_000_000
        )
        exporter = None
        try:
            data = tune_config(
                config, share=1.0, ip_high_water=0.9, min_interval_seconds=args.interval
            )
            exporter, url = start_exporter(config, workdir)
            rss_ready = rss_mib(exporter.pid)
            time.sleep(5 * args.interval)  # a few rounds before the baseline
            text = get(f"{url}/metrics").decode()
            start = {
                "time": time.time(),
                "rss_mib": rss_mib(exporter.pid),
                "series": len(series(text)),
                "refreshes": counter(
                    text, "binance_pm_requests_total", endpoint="balance", outcome="success"
                ),
            }
            baseline_series = set(series(text))
            churn = Churn(sim_url, [a["name"] for a in data["accounts"]], args.churn_every)
            churn.start()
            done = 0.0
            while done < args.refreshes:
                time.sleep(10)
                text = get(f"{url}/metrics").decode()
                done = (
                    counter(
                        text, "binance_pm_requests_total", endpoint="balance", outcome="success"
                    )
                    - start["refreshes"]
                )
                samples.append(
                    {
                        "t": round(time.time() - start["time"]),
                        "refreshes": int(done),
                        "rss_mib": round(rss_mib(exporter.pid), 1),
                        "series": len(series(text)),
                        "live_churn_assets": sum(len(v) for v in churn.live.values()),
                    }
                )
                print(json.dumps(samples[-1]), flush=True)
            churn.stop()
            churn.remove_all()
            cleared = time.time()

            def back_to_start() -> str | None:
                now = get(f"{url}/metrics").decode()
                return now if set(series(now)) == baseline_series else None

            text = wait_for(back_to_start, 10 * args.interval + 30, "the series to come back")
            end = {
                "rss_mib": rss_mib(exporter.pid),
                "series": len(series(text)),
                "seconds_to_clear": round(time.time() - cleared, 1),
            }
            up = [line for line in text.splitlines() if line.startswith("binance_pm_up{")]
            report = {
                "setup": {
                    "accounts": args.accounts,
                    "assets_per_account": args.assets,
                    "interval_seconds": args.interval,
                    "churn_every_seconds": args.churn_every,
                },
                "refreshes": int(done),
                "seconds": round(cleared - start["time"], 1),
                "assets_added": churn.added,
                "assets_removed": churn.removed,
                "rss_mib": {
                    "ready": round(rss_ready, 1),
                    "start": round(start["rss_mib"], 1),
                    "max": max(s["rss_mib"] for s in samples),
                    "end": round(end["rss_mib"], 1),
                },
                "series": {
                    "start": start["series"],
                    "max": max(s["series"] for s in samples),
                    "end": end["series"],
                    "leftover": len(set(series(text)) - baseline_series),
                    "seconds_to_clear": end["seconds_to_clear"],
                },
                "failed_requests": failures(text),
                "accounts_up": sum(line.endswith(" 1.0") for line in up),
                "samples": samples,
            }
        finally:
            if exporter is not None:
                stop(exporter)
            stop(sim)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
