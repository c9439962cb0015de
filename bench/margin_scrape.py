"""Scrape cost and memory with the margin collectors' positions on (issue 21).

200 accounts x 30 assets, and with `--positions`, each account's UM book with 20 open
positions and its CM book with 5 (GET /papi/v1/{um,cm}/account parsed by the collectors):
the cached exposition's first full render, the render after 3 accounts changed (the
default budget's pace per 5 s), the body's size and series, and the process's peak RSS.
Each mode runs in a process of its own; with `--tree DIR` the exporter package is read
from another tree (main's, for the figures side by side; it has no positions).

    PYTHONPATH=. python bench/margin_scrape.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCOUNTS, ASSETS, UM_POSITIONS, CM_POSITIONS = 200, 30, 20, 5


def _book(rng: random.Random, book: str, count: int) -> dict[str, object]:
    quote = "USDT" if book == "um" else "USD_PERP"
    positions = [
        {
            "symbol": f"SYM{i}{quote}",
            "positionSide": "BOTH",
            "positionAmt": f"{rng.uniform(-50, 50):.3f}",
            "entryPrice": f"{rng.uniform(1, 60000):.2f}",
            "unrealizedProfit": f"{rng.gauss(0, 100):.8f}",
            "maintMargin": f"{rng.uniform(1, 500):.8f}",
            "initialMargin": f"{rng.uniform(1, 5000):.8f}",
            "leverage": "20",
            "maxNotional": "250000",
        }
        for i in range(count)
    ]
    assets = [
        {
            "asset": asset,
            "crossWalletBalance": "1000.5",
            "crossUnPnl": "-2.25",
            "maintMargin": "30.1",
            "initialMargin": "300.2",
            "positionInitialMargin": "290.1",
            "openOrderInitialMargin": "10.1",
        }
        for asset in (("USDT", "USDC") if book == "um" else ("BTC", "ETH", "BNB"))
    ]
    return {"assets": assets, "positions": positions}


def measure(positions: bool) -> dict[str, float]:
    sys.path.insert(0, str(Path.cwd()))
    from bench.common import synthetic_account  # noqa: PLC0415
    from exporter.exposition import CachedExposition  # noqa: PLC0415
    from exporter.snapshot import SnapshotStore  # noqa: PLC0415

    rng = random.Random(21)
    accounts = [synthetic_account(f"acct-{i:03d}", ASSETS, rng) for i in range(ACCOUNTS)]
    families = None
    if positions:
        from exporter.collector import families_of  # noqa: PLC0415
        from exporter.collectors import enabled  # noqa: PLC0415
        from exporter.collectors.cm_account import COLLECTOR as CM  # noqa: PLC0415
        from exporter.collectors.um_account import COLLECTOR as UM  # noqa: PLC0415

        families = families_of(enabled({"um_account": True, "cm_account": True}))
        accounts = [
            CM.put(
                UM.put(a, UM.parse(_book(rng, "um", UM_POSITIONS))),
                CM.parse(_book(rng, "cm", CM_POSITIONS)),
            )
            for a in accounts
        ]
    store = SnapshotStore(accounts)

    def exposition() -> CachedExposition:
        return CachedExposition(store) if families is None else CachedExposition(store, families)

    cold = []
    for _ in range(5):
        fresh = exposition()
        started = time.perf_counter()
        body = fresh.text("text")
        cold.append(time.perf_counter() - started)
    cached = exposition()
    cached.text("text")
    changed = []
    for round_ in range(10):
        for i in range(3):
            name = f"acct-{(round_ * 3 + i) % ACCOUNTS:03d}"
            store.replace(replace(store.get(name), last_success=time.time()))
        started = time.perf_counter()
        cached.text("text")
        changed.append(time.perf_counter() - started)
    lines = [line for line in body.decode().splitlines() if not line.startswith("#")]
    return {
        "series": len(lines),
        "bytes": len(body),
        "cold_ms": statistics.median(cold) * 1000,
        "changed_ms": statistics.median(changed) * 1000,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["off", "on"])
    parser.add_argument("--tree", type=Path, default=None, help="main's tree, for 'before'")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "on")))
        return
    runs = [("main's code", args.tree, "off")] if args.tree else []
    runs += [("this branch, margin off", ROOT, "off"), ("this branch, margin on", ROOT, "on")]
    for label, tree, mode in runs:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        out = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "margin_scrape.py"), "--child", mode],
            env=env,
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(label, out.strip())


if __name__ == "__main__":
    main()
