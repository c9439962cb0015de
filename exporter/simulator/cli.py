"""`python -m exporter.simulator`: run the simulator on its own until SIGTERM or SIGINT.

With --trade-rate N the desk trades: N fills a second across the accounts (Poisson),
each pushing the events of a fill (`exporter.simulator.trading`). With --write-config
it first writes an exporter config pointing at itself
(accounts sim-00, sim-01, ... with their secrets inline, file mode 0600). The line
`simulator listening on http://HOST:PORT` on stdout says it is ready; the next line,
`simulator stream on ws://HOST:PORT/pm/ws`, gives the user data stream's base URL.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from exporter.simulator.demo import (
    BALANCE_MOVE_CHANCE,
    account_name,
    exporter_config,
    generate_account,
    start_drift,
)
from exporter.simulator.server import Simulator
from exporter.simulator.trading import start_trading


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    host, port = args.listen
    generated = [
        generate_account(account_name("sim-", i, args.accounts), args.key_type)
        for i in range(args.accounts)
    ]
    sim = Simulator(
        [g.sim_account for g in generated],
        host,
        port,
        ip_weight_limit=args.ip_weight_limit,
        assets_per_account=args.assets,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sim.start()
    except OSError as error:
        print(f"simulator: cannot listen on {host}:{port}: {error.strerror}", file=sys.stderr)
        return 1
    try:
        drift = None
        if args.drift is not None:
            drift = start_drift(sim, assets_per_account=args.assets, move_chance=args.drift)
        if args.trade_rate > 0:
            if drift is None:
                start_trading(sim, args.trade_rate)
            else:  # the drift's ticks serve its portfolios: its fills go through it
                start_trading(sim, args.trade_rate, fill=drift.fill, assets=drift.assets)
        if args.write_config is not None:
            budget = {"ip_weight_limit_per_minute": args.ip_weight_limit}
            write_config(
                args.write_config,
                exporter_config(sim.url, generated, budget=budget, stream_url=sim.stream_url),
            )
        print(f"simulator listening on {sim.url}", flush=True)
        print(f"simulator stream on {sim.stream_url}", flush=True)
        stop.wait()
    except OSError as error:
        print(f"simulator: {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    finally:
        sim.stop()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.simulator",
        description="A simulator of the Binance Portfolio Margin API, for tests and demos.",
    )
    parser.add_argument(
        "--listen", type=_host_port, default=("127.0.0.1", 0), metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:0, a free port)",
    )  # fmt: skip
    parser.add_argument("--accounts", type=_positive, default=3, help="accounts (default 3)")
    parser.add_argument(
        "--assets", type=_positive, default=8, help="assets per account (default 8)"
    )
    parser.add_argument("--key-type", choices=("hmac", "rsa", "ed25519"), default="hmac")
    parser.add_argument("--ip-weight-limit", type=_positive, default=6000, metavar="WEIGHT")
    parser.add_argument(
        "--drift",
        nargs="?",
        type=_chance,
        const=BALANCE_MOVE_CHANCE,
        metavar="CHANCE",
        help="move balances every second: unrealized PnL always, and with CHANCE (default "
        f"{BALANCE_MOVE_CHANCE}) per asset the free balance, which pushes an event; "
        "1 pushes events for every account every second",
    )
    parser.add_argument(
        "--trade-rate", type=_rate, default=0.0, metavar="N",
        help="trade: N fills per second across all accounts (Poisson; default 0), each a "
        "small change pushing an ACCOUNT_UPDATE (reason ORDER) and an "
        "outboundAccountPosition; never on an account driven negative",
    )  # fmt: skip
    parser.add_argument(
        "--write-config", type=Path, metavar="PATH",
        help="write an exporter config (YAML, secrets inline) pointing at this simulator",
    )  # fmt: skip
    return parser


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0 <= rate <= 10_000:
        raise argparse.ArgumentTypeError(
            f"expected a rate from 0 to 10000 per second, got {text!r}"
        )
    return rate


def _chance(text: str) -> float:
    try:
        chance = float(text)
    except ValueError:
        chance = -1.0
    if not 0 <= chance <= 1:
        raise argparse.ArgumentTypeError(f"expected a chance from 0 to 1, got {text!r}")
    return chance


class _ConfigDumper(yaml.SafeDumper):
    """Writes multi-line strings (PEM keys) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ConfigDumper.add_representer(str, _str)


def write_config(path: Path, data: dict[str, Any]) -> None:
    """Write config data as YAML, readable by its owner only (it holds secrets)."""
    text = yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
