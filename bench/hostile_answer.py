"""Scrape time after one balance answer of 100,000 assets (issue 17, #8).

Two accounts against the bundled simulator, refreshed every 5 s; the median of 20
kept-alive scrapes, gzip and identity, before and after acct-00's answer grows to
100,000 assets of 2 fields. Run from the repository root:

    .venv/bin/python bench/hostile_answer.py

Against another checkout (main, for the figure before), put it first on PYTHONPATH.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.exporterproc import ExporterProcess, running
from support.harness import accounts

from exporter.simulator import Simulator
from exporter.simulator.demo import exporter_config

BUDGET = {"ip_weight_limit_per_minute": 60000, "share": 1.0, "min_interval_seconds": 5}


def median_ms(run: ExporterProcess, encoding: str) -> tuple[float, int]:
    with httpx.Client(timeout=10, headers={"Accept-Encoding": encoding}) as client:
        client.get(run.url + "/metrics")
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            response = client.get(run.url + "/metrics")
            latencies.append(time.monotonic() - started)
    return statistics.median(latencies) * 1000, len(response.content)


def main() -> None:
    generated = accounts(2)
    with Simulator([g.sim_account for g in generated]) as sim:
        directory = Path(tempfile.mkdtemp())
        config = directory / "config.yaml"
        config.write_text(yaml.safe_dump(exporter_config(sim.url, generated, budget=BUDGET)))
        with running("--config.file", str(config)) as run:
            time.sleep(3)  # a benchmark, not a test: a first refresh of both accounts
            for label in ("normal", "100,000 assets"):
                if label != "normal":
                    junk = [
                        {"asset": f"JUNK{i}", "totalWalletBalance": "1.5", "crossMarginFree": "1"}
                        for i in range(100_000)
                    ]
                    sim.set_balances("acct-00", junk)
                    time.sleep(15)
                gzip_ms, size = median_ms(run, "gzip")
                identity_ms, _ = median_ms(run, "identity")
                print(
                    f"{label}: {size} bytes; gzip {gzip_ms:.1f} ms, identity {identity_ms:.1f} ms"
                )


if __name__ == "__main__":
    main()
