"""What issue 22's additions cost at scale, main's code against this tree's, in one run.

Per tree (each in a subprocess of its own, with that tree first on sys.path), with N
accounts (labels and two thresholds each where the tree knows them):
  live      the served registry rendered per scrape (self-metrics; here also process_*,
            python_*, and the cgroup memory limit)
  cached    a scrape that finds the snapshot's exposition cached
  render    the snapshot's exposition rendered anew (every account changed)
And, for this tree only, `accounts_dir` with N account files: load and check.
Figures are medians of repeated runs, in ms.

    python bench/desk_scale.py [--accounts 500] [--main /work/main]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

MEASURE = r"""
import json, statistics, sys, tempfile, time
from pathlib import Path
from prometheus_client import generate_latest
from exporter.app import Exporter
from exporter.config import parse_config, AccountConfig
from exporter.simulator.demo import exporter_config, generate_account

n, runs = int(sys.argv[1]), int(sys.argv[2])
meta = "labels" in AccountConfig.model_fields
data = exporter_config(
    "http://127.0.0.1:1", [generate_account(f"acct-{i:04d}", "hmac") for i in range(n)]
)
if meta:
    for i, account in enumerate(data["accounts"]):
        account["labels"] = {"desk": f"d{i % 7}", "team": f"t{i % 3}"}
        account["thresholds"] = {"uni_mmr_warning": 1.4, "uni_mmr_critical": 1.15}
exporter = Exporter(parse_config(data, environ={}, base_dir=Path.cwd()))


def median_ms(call, repeat):
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def rerender():
    exposition = exporter.exposition
    exposition._fragments.clear()
    exposition._bodies.clear()
    exposition.text("text")


result = {
    "meta": meta,
    "live": median_ms(lambda: generate_latest(exporter.registry), runs),
    "cached": median_ms(lambda: exporter.exposition.text("text"), runs * 10),
    "render": median_ms(rerender, runs),
}
if meta:
    from exporter.cli import load_checked

    directory = Path(tempfile.mkdtemp())
    (directory / "accounts.d").mkdir()
    for i in range(n):
        name = f"desk-{i:04d}"
        (directory / "accounts.d" / f"{name}.yaml").write_text(
            f"name: {name}\napi_key: key-{i}\napi_secret: secret-{i}\n"
            f"labels: {{desk: d{i % 7}}}\nthresholds: {{uni_mmr_critical: 1.15}}\n"
        )
    (directory / "config.yaml").write_text("accounts_dir: accounts.d\n")
    result["accounts_dir"] = median_ms(lambda: load_checked(directory / "config.yaml", {}), 5)
print(json.dumps(result))
"""


def measure(tree: Path, accounts: int, runs: int) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, "-c", MEASURE, str(accounts), str(runs)],
        cwd=tempfile.gettempdir(),
        env={"PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures: dict[str, float] = json.loads(output)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--main", type=Path, default=Path("/work/main"))
    args = parser.parse_args()
    rows = {}
    for name, tree in (("main", args.main), ("this tree", HERE)):
        rounds = [measure(tree, args.accounts, args.runs) for _ in range(3)]
        rows[name] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"{args.accounts} accounts; medians in ms")
    print(f"{'':10} {'live':>8} {'cached':>8} {'render':>8} {'accounts_dir':>13}")
    for name, row in rows.items():
        files = f"{row['accounts_dir']:13.1f}" if "accounts_dir" in row else f"{'-':>13}"
        print(f"{name:10} {row['live']:8.2f} {row['cached']:8.3f} {row['render']:8.1f} {files}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
