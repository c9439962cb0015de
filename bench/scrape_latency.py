"""Target 1: /metrics latency with 200 accounts x 30 assets (~76k series).

Three servers on the same stack (the exporter's HTTP server, loopback):
  ours      the exporter's /metrics: cached snapshot exposition + live self-metrics
  baseline  the same registry rendered by prometheus_client per scrape (generate_latest)
  static    the bytes `ours` serves, as a constant: the practical limit
Each scenario is measured in interleaved rounds; figures are medians in ms.
"churn": a thread replaces an account --refreshes times a second (6.7: 200 accounts
every 30 s) and each scrape comes at a random moment after a new one, so every scrape
sees a new snapshot generation.

    PYTHONPATH=. python bench/scrape_latency.py [--accounts 200] [--assets 30] [--rounds 5]
    PYTHONPATH=. python bench/scrape_latency.py --tree /tmp/main-tree [--repeat 2]

With `--tree DIR`, the exporter package of DIR (main's, for "before") and this tree's
each run in a process of their own, alternately, `--repeat` times; the medians are
over all of a tree's scrapes, and each tree has its own static-file column.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import median, synthetic_account, table
from prometheus_client import CollectorRegistry

from exporter.app import Exporter
from exporter.collector import SnapshotCollector
from exporter.config import parse_config
from exporter.http import ExporterApp, MetricsServer, Request, Response
from exporter.serve import serve_http
from exporter.simulator.demo import exporter_config, generate_account
from exporter.webconfig import WebConfig

#: what Prometheus 2 asks for; prometheus_client escapes every name in it character by character
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
#: what Prometheus 3 asks for: names may be UTF-8, so prometheus_client only escapes quotes
PROMETHEUS_3 = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;"
    "escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


def scrape(port: int, headers: dict[str, str], path: str = "/metrics") -> tuple[float, int]:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 200, response.status
    return time.perf_counter() - started, len(body)


class StaticApp:
    """The same bytes and headers as a given response, served as a constant."""

    web = WebConfig()
    reloads = None

    def start(self, on_start: object) -> None:
        pass

    def close(self) -> None:
        pass

    def __init__(self) -> None:
        self.responses: dict[tuple[str, str], tuple[list[tuple[str, str]], bytes]] = {}

    def __call__(self, request: Request) -> Response:
        key = (request.headers.get("accept", ""), request.headers.get("accept-encoding", ""))
        headers, body = self.responses[key]
        return Response(200, list(headers), [body])


def capture(port: int, headers: dict[str, str]) -> tuple[list[tuple[str, str]], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("GET", "/metrics", headers=headers)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    dropped = ("date", "server", "content-length")  # the server adds Content-Length itself
    kept = [(k, v) for k, v in response.getheaders() if k.lower() not in dropped]
    return kept, body


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--assets", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--refreshes", type=float, default=6.7, help="account refreshes a second")
    parser.add_argument(
        "--per-round", type=int, default=10, help="scrapes per round (ours, static)"
    )
    parser.add_argument("--tree", type=Path, default=None, help="main's tree, for 'before'")
    parser.add_argument("--repeat", type=int, default=2, help="runs per tree, with --tree")
    parser.add_argument("--json", action="store_true", help="print the raw times as JSON")
    parser.add_argument(
        "--file-nice",
        type=int,
        default=10,
        help="the file server's nice: the exporter's HTTP threads run at 10 (HTTP_NICE)",
    )
    args = parser.parse_args()
    if args.tree is not None:
        return compare(args)
    times = measure(args)
    if args.json:
        print(json.dumps([[variant, name, t] for (variant, name), t in times.items()]))
    else:
        print(results_table(times))
    return 0


def compare(args: argparse.Namespace) -> int:
    """Run `measure` in a process per tree, alternately; one table of both."""
    passed = [
        f"--accounts={args.accounts}", f"--assets={args.assets}", f"--rounds={args.rounds}",
        f"--refreshes={args.refreshes}", f"--per-round={args.per_round}", "--json",
        f"--file-nice={args.file_nice}",
    ]  # fmt: skip
    trees = {"before": args.tree.resolve(), "after": ROOT_DIR}
    times: dict[str, dict[tuple[str, str], list[float]]] = {label: {} for label in trees}
    for _ in range(args.repeat):
        for label, tree in trees.items():
            # the tree first, then this one for `common` (which then adds nothing before it)
            env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT_DIR}"}
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), *passed],
                env=env, cwd=tree, capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            for variant, name, values in json.loads(out.splitlines()[-1]):
                times[label].setdefault((variant, name), []).extend(values)
    rows = []
    for variant in {v for v, _ in times["after"]}:
        row: list[object] = [variant]
        for label in trees:
            churn = median(times[label][(variant, "ours churn")])
            file = median(times[label][(variant, "file")])
            row += [churn, file, f"{churn / file:.2f}x"]
        rows.append(row)
    rows.sort(key=lambda row: list(VARIANTS).index(str(row[0])))
    print(
        f"{args.refreshes} refreshes/s; medians in ms over {args.repeat} runs per tree, "
        f"{args.repeat * args.rounds * args.per_round} scrapes per cell; "
        f"file server at nice {args.file_nice}"
    )
    print(table(
        ["format", "before: churn", "static file", "churn/file",
         "after: churn", "static file", "churn/file"],
        rows,
    ))  # fmt: skip
    return 0


VARIANTS = {
    "text": {"Accept-Encoding": "identity"},
    "openmetrics": {"Accept": OPENMETRICS, "Accept-Encoding": "identity"},
    "text+gzip": {"Accept-Encoding": "gzip"},
    "openmetrics+gzip": {"Accept": OPENMETRICS, "Accept-Encoding": "gzip"},
    "openmetrics+gzip, Prometheus 3": {"Accept": PROMETHEUS_3, "Accept-Encoding": "gzip"},
}


def measure(args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    """Scrape times in ms by (variant, server), with the sizes on stderr."""

    rng = random.Random(7)
    generated = [generate_account(f"acct-{i:03d}", "hmac") for i in range(args.accounts)]
    config = parse_config(
        exporter_config("http://127.0.0.1:1", generated), environ={}, base_dir=ROOT_DIR
    )
    exporter = Exporter(config)
    for account in exporter.store.current.accounts:
        exporter.store.replace(synthetic_account(account, args.assets, rng))
    for endpoint in ("balance", "account", "time"):  # live self-metrics with samples
        for outcome in ("success", "server_error", "timeout"):
            exporter.instruments.requests.labels(endpoint, outcome).inc(3)
        exporter.instruments.duration.labels(endpoint).observe(0.05)

    ours = serve_http(exporter, "127.0.0.1", 0)
    everything = CollectorRegistry()  # the snapshot and the live metrics, all per scrape
    everything.register(SnapshotCollector(exporter.store))
    everything.register(exporter.registry)
    baseline = MetricsServer(ExporterApp(everything, exporter.store), "127.0.0.1", 0)
    baseline.start()
    static_app = StaticApp()
    static = MetricsServer(static_app, "127.0.0.1", 0)  # type: ignore[arg-type]
    static.start()

    variants = VARIANTS
    for headers in variants.values():
        key = (headers.get("Accept", ""), headers.get("Accept-Encoding", ""))
        static_app.responses[key] = capture(ours.port, headers)
    series = sum(
        1
        for line in static_app.responses[("", "identity")][1].splitlines()
        if not line.startswith(b"#")
    )
    print(
        f"{args.accounts} accounts x {args.assets} assets: {series} series; "
        f"{args.refreshes} refreshes/s; "
        f"text {len(static_app.responses[('', 'identity')][1]) / 1e6:.1f} MB, "
        f"gzip {len(static_app.responses[('', 'gzip')][1]) / 1e6:.2f} MB",
        file=sys.stderr,
    )

    files = tempfile.TemporaryDirectory(prefix="scrape-latency-")
    for index, headers in enumerate(variants.values()):
        key = (headers.get("Accept", ""), headers.get("Accept-Encoding", ""))
        (Path(files.name) / f"v{index}").write_bytes(static_app.responses[key][1])
    file_server, file_port = _file_server(files.name, args.file_nice)

    names = list(exporter.store.current.accounts)
    fresh = [synthetic_account(n, args.assets, rng) for n in names]  # churn data, made up front

    # Refreshes land on their own clock, --refreshes a second, while scrapes come at
    # random moments between them: every churn scrape finds a newer snapshot than the last.
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(1 / args.refreshes):
            exporter.store.replace(fresh[rng.randrange(len(fresh))])

    refresher = threading.Thread(target=refresh, daemon=True)
    refresher.start()
    seen = [exporter.store.current.generation]

    def churn() -> None:
        while exporter.store.current.generation == seen[0]:
            time.sleep(0.001)
        time.sleep(random.uniform(0, 1 / args.refreshes))
        seen[0] = exporter.store.current.generation

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for index, (variant, headers) in enumerate(variants.items()):
            for name, port, count, before in (
                ("ours", ours.port, args.per_round, None),
                ("ours churn", ours.port, args.per_round, churn),
                ("static", static.port, args.per_round, None),
                ("file", file_port, args.per_round, None),
                ("baseline", baseline.port, 1, None),
            ):
                for _ in range(count):
                    if before is not None:
                        before()
                    if name == "file":
                        elapsed, _ = scrape(port, {}, f"/v{index}")
                    else:
                        elapsed, _ = scrape(port, headers)
                    times.setdefault((variant, name), []).append(elapsed * 1000)
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    print(
        f"renders of the snapshot exposition: {exporter.exposition.renders}; "
        f"scrapes per cell: {args.rounds * args.per_round} (baseline {args.rounds})",
        file=sys.stderr,
    )
    stop.set()
    for server in (ours, baseline, static):
        server.close()
    file_server.kill()
    file_server.wait()
    files.cleanup()
    return times


def results_table(times: dict[tuple[str, str], list[float]]) -> str:
    rows = []
    for variant in VARIANTS:
        m = {
            name: median(times[(variant, name)])
            for name in ("ours", "ours churn", "static", "file", "baseline")
        }
        rows.append([
            variant, m["ours"], m["ours churn"], m["static"], m["file"], m["baseline"],
            f"{m['ours'] / m['file']:.2f}x", f"{m['ours churn'] / m['file']:.2f}x",
        ])  # fmt: skip
    return table(
        ["format", "ours ms", "ours churn ms", "static ms", "static file ms",
         "generate_latest ms", "ours/file", "churn/file"],
        rows,
    )  # fmt: skip


def _file_server(directory: str, nice: int) -> tuple[subprocess.Popen[bytes], int]:
    """`python -m http.server` on a free loopback port, serving `directory`, at `nice` (on
    a busy machine a nice-0 server gets ~10x the CPU share of the exporter's HTTP threads)."""
    import socket  # noqa: PLC0415 - only here

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = subprocess.Popen(
        [
            "nice",
            "-n",
            str(nice),
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


ROOT_DIR = __import__("pathlib").Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    raise SystemExit(main())
