"""What bench/load.py and bench/soak.py share: the simulator and the exporter as processes,
their memory, /metrics series and the simulator's request log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def use_tree(tree: Path) -> None:
    """Run the simulator and the exporter from `tree` (another checkout) from now on: on
    its path and in it (`python -m` puts the working directory first on sys.path)."""
    ENV["PYTHONPATH"] = str(tree.resolve())


def _tree() -> str:
    return ENV["PYTHONPATH"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = condition()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.1)


def get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def send(method: str, url: str, body: object | None = None) -> None:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def start_simulator(
    workdir: Path, *, accounts: int, assets: int, ip_weight_limit: int
) -> tuple[subprocess.Popen[str], str, Path]:
    """`python -m exporter.simulator ... --write-config`: the process, its URL, the config."""
    config = workdir / "config.yaml"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter.simulator",
            "--listen",
            "127.0.0.1:0",
            "--accounts",
            str(accounts),
            "--assets",
            str(assets),
            "--ip-weight-limit",
            str(ip_weight_limit),
            "--write-config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=_tree(),
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("simulator listening on "):
        raise SystemExit(f"simulator did not start: {line!r}")
    return process, line.rsplit(" ", 1)[1], config


def tune_config(path: Path, **budget: Any) -> dict[str, Any]:
    """Set budget keys (share, min_interval_seconds, ...) in the written config."""
    data = yaml.safe_load(path.read_text())
    data.setdefault("budget", {}).update(budget)
    data.setdefault("binance", {})["timeout_seconds"] = 5
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def start_exporter(config: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m exporter` with that config; returns once /readyz says every account
    has been refreshed."""
    port = free_port()
    log = (workdir / "exporter.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warning",
            "--log.format=json",
        ],
        stdout=log,
        stderr=log,
        env=ENV,
        cwd=_tree(),
    )
    log.close()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise SystemExit((workdir / "exporter.log").read_text())
        try:
            return get(f"{url}/readyz", timeout=5).startswith(b'{"status": "ready"')
        except urllib.error.HTTPError:
            return False

    wait_for(ready, 120, "the exporter to be ready")
    return process, url


def stop(process: subprocess.Popen[Any]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=20)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def series(metrics_text: str, prefix: str = "binance_pm_") -> list[str]:
    """The sample lines (name and labels, no value) of the exporter's metrics."""
    return [line.rsplit(" ", 1)[0] for line in metrics_text.splitlines() if line.startswith(prefix)]


def sim_requests(sim_url: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(get(f"{sim_url}/_sim/requests", timeout=60))
    return records


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
