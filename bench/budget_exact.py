"""Target 4: the weight budget spent exactly, and yielding to another client on the IP.

Phase 1 (3 minutes): 20 accounts, B = 6000 x 0.2 = 1,200 weight/min, w = 40
(balance + account info). The simulator counts weight per client IP, as Binance
does. Figures: the exporter's weight in every sliding 60 s window (max <= B) and
per calendar minute, the share of B used (>= 95%), 429/418 answers (0), each
account's mean refresh interval against N*w/B = 40 s (within 5%).

Phase 2 (2 minutes): another client on the same IP spends 80% of the IP's 6,000
per minute (4,800 in the first 10 s of every minute, as a bursty bot would). The
exporter must yield (high-water pauses at 4,800) and no request may get a 429.
The figures are read from the simulator's request log (time, client IP,
weight, status of every request) and its per-IP minute counter.

    PYTHONPATH=. python bench/budget_exact.py [--minutes 3] [--foreign-minutes 2]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from pathlib import Path

from common import exporter_thread, table

from exporter.app import Exporter
from exporter.config import parse_config
from exporter.logs import configure_logging
from exporter.simulator import Simulator
from exporter.simulator.demo import exporter_config, generate_account
from exporter.simulator.state import RequestRecord

N, W, LIMIT, SHARE = 20, 40, 6000, 0.2
B = LIMIT * SHARE
FOREIGN = int(LIMIT * 0.8)  # another client's spend per minute
IP = "127.0.0.1"


def windows(records: list[RequestRecord], start: float, end: float) -> tuple[int, int]:
    """Max and min weight over sliding 60 s windows [t, t+60) within [start, end)."""
    times = [r.time for r in records]
    prefix = [0]
    for r in records:
        prefix.append(prefix[-1] + r.weight)
    sums = []
    t = start
    while t + 60 <= end:
        i, j = bisect_left(times, t), bisect_left(times, t + 60)
        sums.append(prefix[j] - prefix[i])
        t += 0.25
    # every window that starts at a request counts too (the worst case for the max)
    for k, r in enumerate(records):
        if r.time + 60 <= end:
            sums.append(prefix[bisect_left(times, r.time + 60)] - prefix[k])
    return max(sums), min(sums)


def per_minute(records: list[RequestRecord]) -> dict[int, int]:
    minutes: dict[int, int] = defaultdict(int)
    for r in records:
        minutes[int(r.time // 60)] += r.weight
    return dict(minutes)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--foreign-minutes", type=float, default=2.0)
    args = parser.parse_args()
    configure_logging("error", "json")
    generated = [generate_account(f"desk-{i:02d}", "hmac") for i in range(N)]
    with Simulator([g.sim_account for g in generated], IP, ip_weight_limit=LIMIT,
                   assets_per_account=8) as sim:  # fmt: skip
        settings = {"ip_weight_limit_per_minute": LIMIT, "share": SHARE, "min_interval_seconds": 10}
        data = exporter_config(sim.url, generated, budget=settings)
        exporter = Exporter(parse_config(data, environ={}, base_dir=Path.cwd()))
        (budget,) = exporter.budgets
        foreign_stop = threading.Event()
        foreign_spent = 0
        foreign_minutes: dict[int, int] = defaultdict(int)
        max_used = 0

        def foreign() -> None:
            """4,800 weight in the first 10 s of every minute, as a bursty trading bot would."""
            nonlocal foreign_spent, max_used
            minute, spent = -1, 0
            while not foreign_stop.wait(0.1):
                now = sim.state.now_ms() / 1000
                if int(now // 60) != minute:
                    minute, spent = int(now // 60), 0
                due = min(FOREIGN, int(FOREIGN * (now % 60 - 0.5) / 10))
                if due > spent:
                    sim.add_foreign_weight(IP, due - spent)
                    foreign_spent += due - spent
                    foreign_minutes[minute] += due - spent
                    spent = due
                max_used = max(max_used, sim.weight_used(IP))

        # Start on a minute boundary, so that phase 2 starts on one too.
        time.sleep(60 - time.time() % 60 + 0.1)
        with exporter_thread(exporter):
            start = time.time()
            print(f"phase 1: {args.minutes} min, B = {B:.0f}/min ...", flush=True)
            time.sleep(args.minutes * 60)
            phase2 = time.time()
            pauses_before = dict(budget.pauses)
            print(f"phase 2: {args.foreign_minutes} min with a client spending 80% ...", flush=True)
            thread = threading.Thread(target=foreign, daemon=True)
            thread.start()
            time.sleep(args.foreign_minutes * 60)
            foreign_stop.set()
            thread.join()
            end = time.time()
        records = [r for r in sim.requests if r.client_ip == IP]

    one = [r for r in records if r.time < phase2]
    two = [r for r in records if r.time >= phase2]
    refused = {s: sum(1 for r in records if r.status == s) for s in (429, 418)}
    high, low = windows(one, start, phase2)
    total1 = sum(r.weight for r in one)
    used = total1 / ((phase2 - start) / 60) / B
    intervals: dict[str, list[float]] = defaultdict(list)
    last: dict[str, float] = {}
    for r in one:
        if r.path.endswith("/balance") and r.account is not None:
            if r.account in last:
                intervals[r.account].append(r.time - last[r.account])
            last[r.account] = r.time
    target = N * W / B * 60
    means = {a: statistics.mean(v) for a, v in intervals.items()}
    worst = max(abs(m / target - 1) for m in means.values())

    print(table(["phase 1 figure", "measured", "target"], [
        ["weight, max of any 60 s window", high, f"<= {B:.0f}"],
        ["weight, min of any 60 s window", low, ""],
        ["weight per calendar minute", ", ".join(str(v) for v in per_minute(one).values()), ""],
        ["share of B used (whole phase)", f"{used:.1%}", ">= 95%"],
        ["429 / 418 answers", f"{refused[429]} / {refused[418]}", "0 / 0"],
        ["mean refresh interval, accounts", f"{min(means.values()):.2f}-"
         f"{max(means.values()):.2f} s", f"N*w/B = {target:.1f} s"],
        ["worst account vs N*w/B", f"{worst:.2%}", "<= 5%"],
        ["refreshes per account", f"{min(len(v) + 1 for v in intervals.values())}-"
         f"{max(len(v) + 1 for v in intervals.values())}", ""],
    ]))  # fmt: skip
    pauses = {k: budget.pauses[k] - pauses_before.get(k, 0) for k in budget.pauses}
    minutes2 = per_minute(two)
    print()
    print(table(["phase 2 figure", "measured", "target"], [
        ["foreign weight per calendar minute",
         ", ".join(str(v) for v in foreign_minutes.values()) + f" (total {foreign_spent})",
         "80% of 6000 = 4800/min"],
        ["exporter weight per calendar minute", ", ".join(str(v) for v in minutes2.values()),
         "yields"],
        ["high-water pauses", pauses.get("high_water", 0), "1 per minute"],
        ["max IP used weight in a minute", max_used, "<= 6000"],
        ["429 / 418 answers", f"{refused[429]} / {refused[418]}", "0 / 0"],
    ]))  # fmt: skip
    print(
        f"\nexporter requests: {len(one)} in phase 1, {len(two)} in phase 2; "
        f"ran {end - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
