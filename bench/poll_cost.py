"""Target 3: CPU time per account refresh, and the refresh rate one core sustains.

A refresh = sign, send GET /papi/v1/balance (and /papi/v1/account when
account_info is on), parse, swap the new snapshot in. The simulator (300
accounts x 30 assets) runs in a process of its own, so only the exporter's CPU
is counted: process CPU time over a window, divided by the refreshes completed
in it. The exporter is asked for 150 balance refreshes/s (150 accounts,
min_interval 1 s), 30x the 300 balance requests/min one IP permits, and with
account info (two requests per refresh) for 75/s: rates the simulator's one
process answers on a shared 2-core machine. "one core /s" is 1 s / CPU per
refresh. Baseline in the same run: a bare httpx GET of /papi/v1/ping (no
signing, no parsing, no snapshot) at the same rate.

Past what the server answers, requests queue in httpx's pool, whose bookkeeping
is quadratic in the queue (httpcore's _assign_requests_to_connections): CPU
per refresh then grows several-fold. Keep the rate below the server's.

    PYTHONPATH=. python bench/poll_cost.py [--accounts 150] [--accounts-with-info 75]
        [--assets 30] [--seconds 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from common import edit_config, median, simulator_process, table

from exporter.app import Exporter
from exporter.config import load_config
from exporter.logs import configure_logging

IP_LIMIT_BALANCE_PER_MINUTE = 6000 // 20


async def run_exporter(
    config_path: Path, seconds: float, warmup: float
) -> tuple[float, int, float]:
    exporter = Exporter(load_config(config_path))
    stop = asyncio.Event()
    task = asyncio.create_task(exporter.run(stop))
    await asyncio.sleep(warmup)
    cpu0, gen0, wall0 = time.process_time(), exporter.store.current.generation, time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, gen1, wall1 = time.process_time(), exporter.store.current.generation, time.monotonic()
    stop.set()
    await task
    return cpu1 - cpu0, gen1 - gen0, wall1 - wall0


async def run_bare(
    url: str, rate: float, seconds: float, warmup: float
) -> tuple[float, int, float]:
    """Bare GETs at `rate`/s, started on schedule like the poller's, without signing or parsing."""
    done = 0
    async with httpx.AsyncClient(base_url=url) as client:

        async def one() -> None:
            nonlocal done
            response = await client.get("/papi/v1/ping")
            response.raise_for_status()
            done += 1

        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        n = 0
        measuring: tuple[float, int, float] | None = None
        while True:
            now = time.monotonic()
            if measuring is None and now - start >= warmup:
                measuring = (time.process_time(), done, now)
            if now - start >= warmup + seconds:
                break
            due = start + n / rate
            if due > now:
                await asyncio.sleep(due - now)
                continue
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        assert measuring is not None
        cpu1, done1, wall1 = time.process_time(), done, time.monotonic()
        await asyncio.gather(*tasks)
    return cpu1 - measuring[0], done1 - measuring[1], wall1 - measuring[2]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=150)
    parser.add_argument("--accounts-with-info", type=int, default=75)
    parser.add_argument("--assets", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure_logging("error", "json")
    results: dict[str, list[tuple[float, int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        with simulator_process(
            config, accounts=args.accounts, assets=args.assets, ip_weight_limit=10**8
        ) as url:
            everyone = yaml.safe_load(config.read_text())["accounts"]
            for _ in range(args.repeat):
                results.setdefault(f"bare GET /papi/v1/ping ({args.accounts}/s)", []).append(
                    asyncio.run(run_bare(url, args.accounts, args.seconds, 2.0))
                )
                for account_info in (False, True):
                    accounts = args.accounts_with_info if account_info else args.accounts
                    data = edit_config(
                        config, ip_weight_limit_per_minute=10**8, share=1.0,
                        min_interval_seconds=1, collect_account_info=account_info,
                    )  # fmt: skip
                    data["accounts"] = everyone[:accounts]
                    config.write_text(yaml.safe_dump(data, sort_keys=False))
                    name = (
                        f"refresh: balance + account ({accounts}/s asked)"
                        if account_info
                        else f"refresh: balance ({accounts}/s asked)"
                    )
                    results.setdefault(name, []).append(
                        asyncio.run(run_exporter(config, args.seconds, 2.0))
                    )
                print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    rows = []
    bare_us = median([cpu / n * 1e6 for cpu, n, _ in next(iter(results.values()))])
    for name, runs in results.items():
        us = median([cpu / n * 1e6 for cpu, n, _ in runs])
        rate = median([n / wall for _, n, wall in runs])
        cpu_share = median([cpu / wall for cpu, _, wall in runs])
        per_core = 1e6 / us
        rows.append([
            name, us, f"{us / bare_us:.1f}x", rate, f"{cpu_share:.0%}", per_core,
            f"{per_core * 60 / IP_LIMIT_BALANCE_PER_MINUTE:.0f}x",
        ])  # fmt: skip
    print(f"{args.assets} assets per account; medians of {args.repeat} runs of "
          f"{args.seconds:.0f} s")  # fmt: skip
    print(table(
        ["what", "CPU us each", "vs bare GET", "achieved /s", "CPU used", "one core /s",
         "one core vs 300/min"],
        rows,
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
