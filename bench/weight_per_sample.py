"""Target 5: request weight per fresh sample, against polling on every scrape.

Two Prometheus replicas scrape every 15 s (7.5 s apart) for 2 minutes. Ours: the
exporter polls 10 accounts x 30 assets within B = 6000 x 0.25 = 1,500 weight/min
(w = 40: balance + account info), from 127.0.0.1. Beside it, in the same run, an
emulated poll-on-scrape exporter: each scrape of each replica signs and sends
balance + account for every account, from 127.0.0.2, so the simulator counts
the two apart. A sample is fresh when its value comes from an API read newer than
that replica's previous scrape (for ours: the account's last-success time moved).

    PYTHONPATH=. python bench/weight_per_sample.py [--accounts 10] [--minutes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
from common import exporter_thread, table
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter
from exporter.binance.client import BinanceClient, Credentials
from exporter.binance.signing import make_signer
from exporter.config import parse_config
from exporter.logs import configure_logging
from exporter.route import Route
from exporter.serve import serve_http
from exporter.simulator import Simulator
from exporter.simulator.demo import exporter_config, generate_account

W, LIMIT, SHARE, SCRAPE_INTERVAL, REPLICAS = 40, 6000, 0.25, 15.0, 2


def parse(text: str) -> tuple[Counter[str], dict[str, float]]:
    """Series per account, and each account's last-success time."""
    series: Counter[str] = Counter()
    last: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            account = sample.labels.get("account")
            if account is not None:
                series[account] += 1
                if sample.name == "binance_pm_last_success_timestamp_seconds":
                    last[account] = sample.value
    return series, last


async def poll_on_scrape(url: str, credentials: list[Credentials]) -> int:
    """What a poll-on-scrape exporter does per scrape: every account, now. Returns failures."""
    client = BinanceClient(
        base_url=url,
        timeout_seconds=10,
        recv_window_ms=5000,
        route=Route(source_address="127.0.0.2"),
    )
    try:
        results = await asyncio.gather(
            *(client.balance(c) for c in credentials),
            *(client.account(c) for c in credentials),
            return_exceptions=True,
        )
    finally:
        await client.aclose()
    return sum(1 for r in results if isinstance(r, Exception))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=2.0)
    args = parser.parse_args()
    configure_logging("error", "json")
    n = args.accounts
    generated = [generate_account(f"desk-{i:02d}", "hmac") for i in range(n)]
    with Simulator([g.sim_account for g in generated], ip_weight_limit=LIMIT,
                   assets_per_account=30) as sim:  # fmt: skip
        settings = {"ip_weight_limit_per_minute": LIMIT, "share": SHARE, "min_interval_seconds": 10}
        config = parse_config(
            exporter_config(sim.url, generated, budget=settings), environ={}, base_dir=Path.cwd()
        )
        credentials = [
            Credentials(a.api_key, make_signer(a.api_secret, a.private_key))
            for a in config.accounts
        ]
        exporter = Exporter(config)
        server = serve_http(exporter, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.port}"
        with exporter_thread(exporter):
            while httpx.get(f"{url}/readyz").status_code != 200:
                time.sleep(0.2)
            start = time.time()
            seen: list[dict[str, float]] = [{} for _ in range(REPLICAS)]
            ingested = fresh = scrapes = failures = 0
            ages: list[float] = []
            k = 0
            while (due := start + k * SCRAPE_INTERVAL / REPLICAS) < start + args.minutes * 60:
                time.sleep(max(0.0, due - time.time()))
                replica = k % REPLICAS
                now = time.time()
                series, last = parse(httpx.get(f"{url}/metrics").text)
                failures += asyncio.run(poll_on_scrape(sim.url, credentials))
                for account, count in series.items():
                    ingested += count
                    if last.get(account, 0) > seen[replica].get(account, 0):
                        fresh += count
                    ages.append(now - last.get(account, now))
                seen[replica] = last
                scrapes += 1
                k += 1
            end = start + scrapes * SCRAPE_INTERVAL / REPLICAS  # each scrape's share of time
            time.sleep(max(0.0, end - time.time()))
        server.close()
        records = [r for r in sim.requests if start <= r.time < end]
    minutes = (end - start) / 60
    ours = sum(r.weight for r in records if r.client_ip == "127.0.0.1") / minutes
    theirs = sum(r.weight for r in records if r.client_ip == "127.0.0.2") / minutes
    refused = sum(1 for r in records if r.client_ip == "127.0.0.2" and r.status in (429, 418))
    per_min = {"ingested": ingested / minutes, "fresh": fresh / minutes}
    ages.sort()
    print(f"{n} accounts x 30 assets, w = {W}, {REPLICAS} replicas scraping every "
          f"{SCRAPE_INTERVAL:.0f} s, {scrapes} scrapes in {minutes:.1f} min")  # fmt: skip
    print(table(["", "weight/min", "samples ingested/min", "fresh samples/min",
                 "weight per fresh sample", "median data age s", "refused (429/418)"], [
        ["ours (budget B = 1500)", ours, per_min["ingested"], per_min["fresh"],
         ours / per_min["fresh"], ages[len(ages) // 2], 0],
        ["poll on scrape (measured)", theirs, per_min["ingested"], per_min["ingested"],
         theirs / per_min["ingested"], 0.0, refused],
        [f"poll on scrape: N x w x 8 = {n} x {W} x 8", n * W * 8, "", "", "", "", ""],
    ]))  # fmt: skip
    print(
        f"poll-on-scrape failures: {failures}. Ours: {ours / theirs:.0%} of the weight poll on "
        f"scrape spent, {ours / per_min['fresh'] / (theirs / per_min['ingested']):.0%} of its "
        "weight per fresh sample. "
        f"Poll on scrape exceeds the IP's 6000/min from N = {6000 // (W * 8) + 1} accounts "
        f"(w = {W}); ours stays at B whatever N and the number of replicas."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
