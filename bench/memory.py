"""Target 2: resident memory with ~72,000 series, and the cost per series.

Runs the real exporter (`python -m exporter`) against a simulator process with
200 accounts x 30 assets, waits until every account is refreshed, scrapes every
variant of /metrics (text, OpenMetrics, each plain and gzip, so every cache is
filled) and reads the exporter's VmRSS and VmHWM. The baseline, in the same run,
is the same exporter polling 1 account with 1 asset.

    PYTHONPATH=. python bench/memory.py [--accounts 200] [--assets 30] [--repeat 3]
    PYTHONPATH=. python bench/memory.py --tree /tmp/main-tree    # main's exporter beside

With `--tree DIR`, the exporter of DIR (main's, for "before") is measured too, each
repeat one after the other with this tree's, on the same simulator.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _procs import free_port
from common import ROOT, edit_config, median, rss_mb, simulator_process, table

VARIANTS = [
    {"Accept-Encoding": "identity"},
    {"Accept-Encoding": "gzip"},
    {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "identity"},
    {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"},
]


def measure(accounts: int, assets: int, workdir: Path, tree: Path = ROOT) -> dict[str, float]:
    config = workdir / f"config-{accounts}x{assets}.yaml"
    with simulator_process(config, accounts=accounts, assets=assets, ip_weight_limit=10**7):
        edit_config(config, ip_weight_limit_per_minute=10**7, share=1.0, min_interval_seconds=10)
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--config.file", str(config),
             "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warning"],
            env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=60).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("exporter not ready")
                time.sleep(0.2)
            series = 0
            for _ in range(3):
                for headers in VARIANTS:
                    body = httpx.get(f"{url}/metrics", headers=headers, timeout=60).text
                    if headers == VARIANTS[0]:
                        series = sum(1 for line in body.splitlines() if not line.startswith("#"))
            status = Path(f"/proc/{process.pid}/status").read_text()
            hwm = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM"))
            return {"series": series, "rss": rss_mb(process.pid), "hwm": hwm / 1024}
        finally:
            process.terminate()
            process.wait(15)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--assets", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=None, help="main's tree, for 'before'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big, small, before = [], [], []
        for _ in range(args.repeat):
            small.append(measure(1, 1, Path(tmp)))
            if args.tree is not None:
                before.append(measure(args.accounts, args.assets, Path(tmp), args.tree.resolve()))
            big.append(measure(args.accounts, args.assets, Path(tmp)))
            print(".", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    rows = []
    if before:
        rows.append([
            f"{args.accounts} x {args.assets}, {args.tree}",
            int(median([r["series"] for r in before])),
            median([r["rss"] for r in before]),
            median([r["hwm"] for r in before]),
        ])  # fmt: skip
    for name, runs in (("baseline 1 x 1", small), (f"{args.accounts} x {args.assets}", big)):
        series = int(median([r["series"] for r in runs]))
        rows.append(
            [name, series, median([r["rss"] for r in runs]), median([r["hwm"] for r in runs])]
        )
    rows = rows[1:] + rows[:1] if before else rows  # main's row last
    extra_series = rows[1][1] - rows[0][1]
    per_series = (rows[1][2] - rows[0][2]) * 1024 * 1024 / extra_series
    print(table(["exporter", "series", "RSS MB", "peak RSS MB"], rows))
    print(f"cost per series: {per_series:.0f} bytes of RSS "
          f"(({rows[1][2]:.1f} - {rows[0][2]:.1f}) MB / {extra_series} series); "
          f"target RSS <= 120 MB: {'met' if rows[1][2] <= 120 else 'MISSED'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
