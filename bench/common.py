"""Shared by the benchmarks: realistic data, a simulator process, figures side by side."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from exporter.binance.models import parse_account, parse_balances  # noqa: E402
from exporter.simulator import synthetic  # noqa: E402
from exporter.snapshot import AccountSnapshot  # noqa: E402


def synthetic_account(
    name: str, assets: int, rng: random.Random, now: float | None = None
) -> AccountSnapshot:
    """An account as the poller would store it, from simulator-style API records."""
    now = time.time() if now is None else now
    now_ms = int(now * 1000)
    portfolio = synthetic.make_portfolio(rng, assets, now_ms)
    balances = parse_balances([asset.record() for asset in portfolio]).balances
    info = parse_account(synthetic.account_info(portfolio, synthetic.make_risk(rng), now_ms))
    return AccountSnapshot(name, 16.0, balances, info, up=True, attempted=True, last_success=now)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, columns padded."""
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"
    return str(value)


@contextlib.contextmanager
def simulator_process(
    config_path: Path, *, accounts: int, assets: int, ip_weight_limit: int, drift: bool = False
) -> Iterator[str]:
    """`python -m exporter.simulator` in a process of its own; yields its URL."""
    command = [
        sys.executable, "-m", "exporter.simulator", "--accounts", str(accounts),
        "--assets", str(assets), "--ip-weight-limit", str(ip_weight_limit),
        "--write-config", str(config_path),
    ]  # fmt: skip
    if drift:
        command.append("--drift")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("simulator listening on "):
            raise RuntimeError(f"simulator did not start: {line!r}")
        yield line.split()[-1]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)


def edit_config(path: Path, **budget: Any) -> dict[str, Any]:
    """Set budget keys (and `account_info` via collect_account_info) in a written config."""
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    account_info = budget.pop("collect_account_info", None)
    data.setdefault("budget", {}).update(budget)
    if account_info is not None:
        data["collect"] = {"account_info": account_info}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def exporter_thread(exporter: Any) -> Iterator[Any]:
    """Run `exporter.run()` on an event loop in a thread until the block ends."""
    import asyncio  # noqa: PLC0415
    import threading  # noqa: PLC0415

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(exporter.run(stop)), daemon=True
    )
    thread.start()
    try:
        yield exporter
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        loop.close()
