"""The HTTP port against hostile peers (issue 10), on the real exporter process.

The exporter runs as `python -m exporter` with its open-files limit at 1024, soft and
hard, so every machine sees the same limit, polling an in-process simulator every
second. Each test asserts what a peer can and cannot do: a scraper still gets its
metrics, refreshes stay on schedule, `binance_pm_up` stays 1, memory and CPU stay low.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest
import yaml
from support.exporterproc import ExporterProcess
from support.flood import wrong_passwords
from support.harness import accounts
from support.ports import free_port
from support.waits import wait_until

from exporter.app import SHUTDOWN_GRACE_SECONDS
from exporter.simulator import Simulator
from exporter.simulator.demo import exporter_config

pytestmark = pytest.mark.attack

ROOT = Path(__file__).parent.parent
FILES_LIMIT = 1024
USER, PASSWORD = "prom", "scrape-password"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
HALF_SENT = b"GET /metrics HTTP/1.1\r\nHost: exporter\r\n"  # no blank line: never finished


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILES_LIMIT, FILES_LIMIT))


@pytest.fixture(scope="module", autouse=True)
def enough_files_for_the_attacker() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2500:
        pytest.skip(f"the attacker needs 2,500 open files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < 2500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Exporter(ExporterProcess):
    """The exporter under attack, and what the attacks measure of it."""

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.url.removeprefix("http://").rpartition(":")
        return host.strip("[]"), int(port)

    def scrape(self, timeout: float = 5.0, **headers: str) -> httpx.Response:
        return httpx.get(f"{self.url}/metrics", headers={**AUTH, **headers}, timeout=timeout)

    def ups(self) -> list[float]:
        return [
            float(line.rsplit(" ", 1)[1])
            for line in self.scrape().text.splitlines()
            if line.startswith("binance_pm_up{")
        ]

    def stop(self) -> int:
        try:
            return super().stop()
        finally:
            self.kill()


def start_exporter(config: Path, *args: str, listen: str = "127.0.0.1:0") -> Exporter:
    return Exporter(
        "--config.file", str(config), *args, listen=listen, preexec_fn=_limit_open_files
    )


@pytest.fixture(scope="module")
def simulator() -> Iterator[tuple[Simulator, dict[str, object]]]:
    generated = accounts(2)
    with Simulator([g.sim_account for g in generated]) as sim:
        budget = {"ip_weight_limit_per_minute": 60000, "share": 1.0, "min_interval_seconds": 1}
        yield sim, exporter_config(sim.url, generated, budget=budget)


@pytest.fixture(scope="module")
def files(
    simulator: tuple[Simulator, dict[str, object]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The config (polling the simulator every second) and a web config with basic auth."""
    directory = tmp_path_factory.mktemp("attacks")
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(simulator[1]))
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    web = directory / "web.yml"
    web.write_text(f"basic_auth_users:\n  {USER}: '{hashed}'\n")
    return config, web


@pytest.fixture(scope="module")
def exporter(files: tuple[Path, Path]) -> Iterator[Exporter]:
    config, web = files
    running = start_exporter(config, "--web.config.file", str(web))
    try:
        wait_until(lambda: running.ups() == [1.0, 1.0], timeout=20, what="both accounts up")
        yield running
    finally:
        assert running.stop() == 0


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100, method="inclusive")[98]


def timed_scrapes(exporter: Exporter, count: int = 20) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        response = exporter.scrape()
        latencies.append(time.monotonic() - started)
        assert response.status_code == 200
        assert "binance_pm_up{" in response.text
    return latencies


def refresh_gaps(sim: Simulator, since: float, until: float) -> list[float]:
    """Seconds between consecutive balance reads of each account in [since, until]."""
    times: dict[str, list[float]] = {}
    for record in sim.requests:
        if record.path.endswith("/balance") and record.account and since <= record.time <= until:
            times.setdefault(record.account, []).append(record.time)
    return [b - a for t in times.values() for a, b in itertools.pairwise(t)]


def refreshes_since(sim: Simulator, since: float) -> int:
    counts: dict[str, int] = {}
    for record in sim.requests:
        if record.path.endswith("/balance") and record.account and record.time >= since:
            counts[record.account] = counts.get(record.account, 0) + 1
    return min(counts.values(), default=0)


def connect_half_sent(address: tuple[str, int], count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(address, timeout=5)
        sock.sendall(HALF_SENT)
        sockets.append(sock)
    return sockets


def answers(sockets: list[socket.socket], timeout: float) -> list[bytes]:
    """What each socket receives before its peer closes it (b"" when nothing)."""
    received = dict.fromkeys(sockets, b"")
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except (ConnectionError, BlockingIOError):
                    chunk = b""
                received[sock] += chunk
                if not chunk:
                    selector.unregister(sock)
        assert not selector.get_map(), f"{len(selector.get_map())} connections left open"
    return list(received.values())


# --- slowloris -----------------------------------------------------------------------------


@pytest.mark.bench  # times itself: scrape latency (p99), refresh gaps
def test_half_sent_connections_neither_lock_scrapers_out_nor_get_served(
    exporter: Exporter, simulator: tuple[Simulator, dict[str, object]]
) -> None:
    sim = simulator[0]
    start = time.time()
    held = connect_half_sent(exporter.host_port, 1500)  # more than the 1024 files it may open
    try:
        wait_until(lambda: exporter.scrape().status_code == 200, timeout=10, what="a scrape")
        during = timed_scrapes(exporter)
        # Hold the attack over a few refreshes of every account.
        wait_until(lambda: refreshes_since(sim, start) >= 4, timeout=20, what="4 refreshes")
        assert exporter.ups() == [1.0, 1.0]
        gaps = refresh_gaps(sim, start, time.time())
        assert gaps, "no refreshes during the attack"
        assert max(gaps) < 1.0 + 1.0, f"refreshes 1 s apart came late: {max(gaps):.2f} s"
        assert p99(during) < 1.0, f"scrapes during the attack: p99 {p99(during):.2f} s"

        # All at once, each ends its half-sent request: none is answered.
        for sock in held:
            sock.shutdown(socket.SHUT_WR)
        replies = answers(held, timeout=20)
        after = timed_scrapes(exporter)
    finally:
        for sock in held:
            sock.close()
    assert not [reply for reply in replies if reply], "half-sent requests were answered"
    assert p99(after) < 1.0, f"scrapes right after: p99 {p99(after):.2f} s"
    assert exporter.ups() == [1.0, 1.0]


def test_huge_headers_get_431_or_a_closed_connection_and_cost_little_memory(
    exporter: Exporter,
) -> None:
    line = b"X-Padding-%d: " + b"a" * (64 * 1024 - 20) + b"\r\n"
    results: list[bytes] = []

    def send_huge_headers() -> None:
        with socket.create_connection(exporter.host_port, timeout=10) as sock:
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: exporter\r\n")
                for i in range(96):  # 6 MB of headers
                    sock.sendall(line % i)
                sock.sendall(b"\r\n")
            except OSError:
                pass  # closed on us: a fine answer
            try:
                results.append(sock.recv(65536))
            except OSError:
                results.append(b"")

    threads = [threading.Thread(target=send_huge_headers) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 20
    for reply in results:
        assert reply == b"" or reply.startswith(b"HTTP/1.1 431 "), reply[:100]
    assert exporter.status("VmHWM") < 150, f"peak RSS {exporter.status('VmHWM'):.0f} MB"
    assert exporter.scrape().status_code == 200


# --- basic auth ----------------------------------------------------------------------------


@contextlib.contextmanager
def flooding(exporter: Exporter, clients: int, *, hang_up: bool = True) -> Iterator[None]:
    """Wrong passwords, a new one each time, from `clients` threads of another process,
    each as fast as it can."""
    with wrong_passwords(exporter.host_port[1], clients, hang_up=hang_up):
        yield


@pytest.mark.bench  # times itself: scrape latency during a flood
def test_a_wrong_password_flood_costs_little_and_ends_when_it_stops(exporter: Exporter) -> None:
    assert exporter.scrape().status_code == 200  # these credentials are now cached
    # Prometheus keeps its connection alive between scrapes; so does this scraper.
    with httpx.Client(headers=AUTH, timeout=5) as scraper:
        quiet = []
        for _ in range(10):
            started = time.monotonic()
            assert scraper.get(f"{exporter.url}/metrics").status_code == 200
            quiet.append(time.monotonic() - started)
    # 100 ms, the figure, on a machine with a core to spare; on a loaded one
    # (CI is a shared 2-core box) the same scrape is slower without any flood: there the
    # flood may cost at most 3x what the machine itself does.
    bound = max(0.1, 3 * statistics.median(quiet))
    latencies: list[float] = []
    with httpx.Client(headers=AUTH, timeout=5) as scraper, flooding(exporter, 8):
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert scraper.get(f"{exporter.url}/metrics").status_code == 200
            latencies.append(time.monotonic() - started)
    assert len(latencies) >= 5
    assert statistics.median(latencies) < bound, f"cached scrapes: {sorted(latencies)}"

    def idle() -> bool:
        before, started = exporter.cpu_seconds(), time.monotonic()
        time.sleep(0.5)  # real: the exporter's CPU share over half a second of wall time
        return (exporter.cpu_seconds() - before) / (time.monotonic() - started) < 0.10

    wait_until(idle, timeout=2.5, step=0, what="the exporter idle (< 10 % CPU)")
    assert exporter.scrape().status_code == 200


@pytest.mark.bench  # times itself: the exit within the grace, in wall time
def test_sigterm_during_a_wrong_password_flood_exits_0_within_the_grace(
    files: tuple[Path, Path],
) -> None:
    config, web = files
    running = start_exporter(config, "--web.config.file", str(web))
    try:
        wait_until(lambda: running.scrape().status_code == 200, timeout=20, what="a scrape")
        with flooding(running, 4), flooding(running, 4, hang_up=False):
            # The flood is under way when a client waiting for its 401 has its answer.
            wait_until(lambda: running.scrape(Authorization="Basic eDp5").status_code == 401)
            running.signal(signal.SIGTERM)
            started = time.monotonic()
            running.popen.wait(timeout=SHUTDOWN_GRACE_SECONDS + 5)
            stopped = time.monotonic() - started
        assert running.popen.returncode == 0, "\n".join(running.lines[-5:])
        assert stopped < SHUTDOWN_GRACE_SECONDS
    finally:
        running.kill()


# --- listening and content negotiation ------------------------------------------------------


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_port_alone_listens_on_ipv4_and_ipv6(files: tuple[Path, Path]) -> None:
    config, _ = files
    port = free_port("", socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET)
    running = start_exporter(config, listen=f":{port}")
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        if not _ipv6_loopback():
            pytest.skip("no IPv6 loopback here: the IPv4 half passed")
        assert httpx.get(f"http://[::1]:{port}/healthz", timeout=5).status_code == 200
    finally:
        assert running.stop() == 0


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip;q=0", False),
        ("gzipx", False),
        ("GZIP", True),
        ("identity, gzip;q=0.5", False),
        ("*", True),
    ],
)
def test_accept_encoding(exporter: Exporter, accept_encoding: str, gzipped: bool) -> None:
    response = exporter.scrape(**{"Accept-Encoding": accept_encoding})
    assert response.status_code == 200
    assert response.headers.get("content-encoding") == ("gzip" if gzipped else None)
    assert "binance_pm_up{" in response.text


# --- files ------------------------------------------------------------------------------------


def _run(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=_limit_open_files,
    )
    return done, time.monotonic() - started


@pytest.fixture(scope="module")
def start_seconds(files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> float:
    """How long a run that fails on a small bad file takes: the interpreter and imports."""
    absent = tmp_path_factory.mktemp("absent") / "absent.yml"
    done, seconds = _run(
        "--check-config", "--config.file", str(files[0]), "--web.config.file", str(absent)
    )
    assert done.returncode == 2
    return seconds


@pytest.mark.bench  # times itself: "at once": within 1 s of a normal start
@pytest.mark.parametrize("which", ["config", "web config"])
@pytest.mark.parametrize("source", ["100 MB file", "/dev/zero"])
def test_huge_or_endless_files_exit_2_with_one_line_at_once(
    files: tuple[Path, Path], tmp_path: Path, start_seconds: float, which: str, source: str
) -> None:
    config, _ = files
    huge = Path("/dev/zero")
    if source == "100 MB file":
        huge = tmp_path / "huge.yaml"
        with huge.open("wb") as handle:
            handle.truncate(100 * 1024 * 1024)
    if which == "config":
        args = ["--config.file", str(huge)]
    else:
        args = ["--check-config", "--config.file", str(config), "--web.config.file", str(huge)]
    done, seconds = _run(*args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "too large" in done.stderr or "not a regular file" in done.stderr
    assert seconds - start_seconds < 1.0
