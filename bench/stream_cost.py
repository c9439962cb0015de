"""What the user data stream costs the exporter: memory per open stream, CPU per event.

    python bench/stream_cost.py [--accounts 200] [--seconds 20]

The simulator runs in a process of its own with `--drift 1`, which pushes events for
every account every second. This process opens one `UserDataStream` per account
(one shared pacer and REST client, as one egress would) and measures its resident
memory before and after the streams are open, then its CPU time per event absorbed
(parsed and handed to a counting observer) over `--seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from pydantic import SecretStr

from exporter.binance.client import BinanceClient
from exporter.binance.events import StreamEvent
from exporter.binance.stream import ConnectPacer, StreamObserver, UserDataStream
from exporter.logs import configure_logging

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Counter(StreamObserver):
    def __init__(self, streams: int) -> None:
        self.events = 0
        self.connected = 0
        self.streams = streams
        self.all_open = asyncio.Event()

    def stream_connected(self) -> None:
        self.connected += 1
        if self.connected >= self.streams:
            self.all_open.set()

    def stream_event(self, event: StreamEvent) -> None:
        self.events += 1


async def measure(url: str, stream_url: str, keys: list[str], seconds: float) -> None:
    counter = Counter(len(keys))
    client = BinanceClient(base_url=url, timeout_seconds=10, recv_window_ms=5000)

    async def acquire(weight: int) -> None:
        return None

    pacer = ConnectPacer()
    before = rss_mb()
    streams = [
        UserDataStream(
            account=f"acct-{i}",
            api_key=SecretStr(key),
            client=client,
            stream_url=stream_url,
            acquire=acquire,
            pacer=pacer,
            observer=counter,
        )
        for i, key in enumerate(keys)
    ]
    started = time.monotonic()
    tasks = [asyncio.create_task(s.run()) for s in streams]
    await counter.all_open.wait()
    opened = time.monotonic() - started
    await asyncio.sleep(2)  # let the first events settle
    after = rss_mb()
    events0, cpu0, wall0 = counter.events, time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    events = counter.events - events0
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    for s in streams:
        await s.close()
    await asyncio.gather(*tasks)
    await client.aclose()
    print(f"streams open                 {len(streams)} in {opened:.2f} s")
    print(f"RSS before / after           {before:.1f} MB / {after:.1f} MB")
    print(f"memory per open stream       {(after - before) * 1024 / len(streams):.1f} kB")
    print(f"events absorbed              {events} in {wall:.1f} s ({events / wall:.0f}/s)")
    print(f"CPU per 1,000 events         {cpu / max(events, 1) * 1000 * 1000:.1f} ms")
    print(f"CPU share of one core        {cpu / wall * 100:.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    configure_logging("warning", "json")
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "config.yaml"
        command = [
            sys.executable, "-m", "exporter.simulator", "--accounts", str(args.accounts),
            "--drift", "1", "--write-config", str(config),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert process.stdout is not None
            url = process.stdout.readline().split()[-1]
            stream_url = process.stdout.readline().split()[-1]
            keys = [a["api_key"] for a in yaml.safe_load(config.read_text())["accounts"]]
            asyncio.run(measure(url, stream_url, keys, args.seconds))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(15)


if __name__ == "__main__":
    main()
