"""What the fault-matrix and secrets tests share: the real exporter running in a thread
(or on the virtual clock, the simulator in-process), a recorder of its per-account state,
captured log lines, a TCP relay that can refuse connections, and checks of the weight
budget against the simulator's request log."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import secrets
import socket
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from exporter.app import Exporter
from exporter.clock import SYSTEM_CLOCK, Clock
from exporter.collector import SnapshotCollector
from exporter.config import Config
from exporter.logs import configure_logging
from exporter.poller import BACKOFF_CAP_SECONDS
from exporter.simulator import RequestRecord, SimAccount, Simulator
from exporter.simulator.transport import SimTransport
from exporter.simulator.virtualtime import EventClock
from exporter.snapshot import AccountSnapshot, Snapshot, SnapshotStore
from exporter.webconfig import WebConfig, WebConfigFile
from support import harness
from support.metrics import parse_metrics, sample
from support.ports import free_port
from support.waits import wait_until

#: request weight by path, as Binance (and the simulator) charge it
PATH_WEIGHTS = {"/papi/v1/balance": 20, "/papi/v1/account": 20}


# --- accounts and config ---------------------------------------------------------------------


def hmac_accounts(names: Iterable[str]) -> tuple[list[SimAccount], list[dict[str, str]]]:
    """Fresh HMAC credentials: what the simulator checks, and the config entries."""
    sims, entries = [], []
    for name in names:
        key, secret = secrets.token_hex(32), secrets.token_hex(32)
        sims.append(SimAccount.hmac(name, key, secret))
        entries.append({"name": name, "api_key": key, "api_secret": secret})
    return sims, entries


# --- metrics ---------------------------------------------------------------------------------


# --- the exporter in a thread, and what it did -----------------------------------------------


@dataclass(frozen=True)
class Seen:
    """An account's snapshot as the exporter stored it, and the up gauge a scrape showed."""

    time: float
    snapshot: AccountSnapshot
    up_metric: float | None = None  # rendered only when the account went down


def _scrape(snap: AccountSnapshot) -> str:
    """What a scrape shows of one account: the exporter's collector over its snapshot."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SnapshotCollector(SnapshotStore([snap])))
    return generate_latest(registry).decode()


class Recorder:
    """Keeps every account snapshot the exporter swaps into its store, when it does.

    It wraps the store's `replace` (a spy: the exporter runs unchanged), so a state that
    lasts a few milliseconds (a timeout followed at once by a successful retry) is seen
    however loaded the machine; a recorder sampling the store missed those. When an
    account goes down it also renders that account with the exporter's collector, to see
    what a scrape would have shown of it (binance_pm_up and the kept values) then;
    `up_metric` is set for that first down state only. (Rendering the whole registry
    there would hold the exporter's loop for a while at every fault.)
    """

    def __init__(self, exporter: Exporter, clock: Callable[[], float]) -> None:
        self._exporter = exporter
        self._clock = clock
        self._lock = threading.Lock()
        self._history: dict[str, list[Seen]] = defaultdict(list)
        self.scrapes: dict[str, list[str]] = defaultdict(list)

    def start(self) -> Recorder:
        store = self._exporter.store
        replace = store.replace

        def recording_replace(account: AccountSnapshot) -> Snapshot:
            snapshot = replace(account)
            self._record(account)
            return snapshot

        for account in store.current.accounts.values():
            self._record(account)
        store.replace = recording_replace  # type: ignore[method-assign]
        return self

    def stop(self) -> None:
        self._exporter.store.__dict__.pop("replace", None)

    def _record(self, snap: AccountSnapshot) -> None:
        now = self._clock()
        up_metric = None
        with self._lock:
            earlier = self._history[snap.name]
            was_down = (
                bool(earlier) and earlier[-1].snapshot.attempted and not earlier[-1].snapshot.up
            )
        if snap.attempted and not snap.up and not was_down:  # went down: render once
            text = _scrape(snap)
            self.scrapes[snap.name].append(text)
            up_metric = sample(text, "binance_pm_up", account=snap.name)
        with self._lock:
            self._history[snap.name].append(Seen(now, snap, up_metric))

    def caught_up(self) -> bool:
        """Every account's current snapshot has been recorded."""
        with self._lock:
            seen = {name: h[-1].snapshot for name, h in self._history.items() if h}
        current = self._exporter.store.current.accounts
        return all(seen.get(name) is snap for name, snap in current.items())

    def history(self, name: str) -> list[Seen]:
        with self._lock:
            return list(self._history[name])


class _Readings:
    """What the tests read of a watched exporter."""

    exporter: Exporter

    def snapshot(self, name: str) -> AccountSnapshot:
        return self.exporter.store.get(name)

    def all_up(self, names: Iterable[str] | None = None) -> bool:
        accounts = self.exporter.store.current.accounts
        return all(accounts[n].up for n in (accounts if names is None else names))

    def parsed_metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return parse_metrics(generate_latest(harness.reference_registry(self.exporter)).decode())

    def spent(self, egress: str = "default") -> int:
        return next(b.spent_total for b in self.exporter.budgets if b.egress == egress)


class RunningExporter(_Readings, harness.RunningExporter):
    """The real `Exporter` in a background thread, watched by a Recorder."""

    def __init__(
        self,
        config: Config,
        web: WebConfig | WebConfigFile | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        backoff_cap: float = BACKOFF_CAP_SECONDS,
    ) -> None:
        super().__init__(config, web, clock=clock, backoff_cap=backoff_cap)
        self.recorder = Recorder(self.exporter, clock.now)

    def start(self) -> RunningExporter:
        super().start()
        self.recorder.start()
        return self

    def close(self) -> None:
        """Stop polling and serving, then the recorder (which sees the final state)."""
        try:
            super().close()
        finally:
            self.recorder.stop()

    def settle(self) -> None:
        """Wait until the recorder has seen the store's current state."""
        wait_until(self.recorder.caught_up, 2, "the recorder to catch up")


class VirtualExporter(_Readings):
    """The real `Exporter` on the virtual clock, the simulator in-process (no socket, no
    thread), watched by a Recorder. `run(script)` polls while `script` moves the clock
    (`clock.run_until`) and changes the simulator, then stops the exporter."""

    def __init__(
        self,
        config: Config,
        sim: Simulator,
        clock: EventClock,
        *,
        backoff_cap: float = BACKOFF_CAP_SECONDS,
    ) -> None:
        transport = SimTransport(sim.state, clock)
        self.exporter = Exporter(config, clock=clock, transport=transport, backoff_cap=backoff_cap)
        self.clock = clock
        self.recorder = Recorder(self.exporter, clock.now)
        #: what escaped the exporter's loop (raised by `run` too)
        self.error: BaseException | None = None

    def run(self, script: Callable[[], Awaitable[None]]) -> None:
        """Run the exporter until `script` returns, then stop it."""

        async def go() -> None:
            stop = asyncio.Event()
            self.recorder.start()
            task = asyncio.create_task(self.exporter.run(stop))
            try:
                await script()
                assert not task.done(), "the exporter's loop ended early"
            finally:
                stop.set()
                try:
                    await self.clock.run(task)  # its in-flight requests may wait on the clock
                except BaseException as exc:
                    self.error = exc
                    raise
                finally:
                    self.recorder.stop()

        asyncio.run(go())


# --- logs ------------------------------------------------------------------------------------


class LogLines:
    """Every line the exporter logged (JSON, debug level and up) while captured."""

    def __init__(self) -> None:
        self._buffer = io.StringIO()

    @property
    def file(self) -> io.StringIO:
        return self._buffer

    @property
    def lines(self) -> list[str]:
        return self._buffer.getvalue().splitlines()

    def events(self, event: str | None = None, **match: object) -> list[dict[str, Any]]:
        found = [json.loads(line) for line in self.lines]
        return [
            e
            for e in found
            if (event is None or e.get("event") == event)
            and all(e.get(k) == v for k, v in match.items())
        ]


@contextlib.contextmanager
def captured_logs() -> Iterator[LogLines]:
    """The project's logging set-up, at debug level, writing into a buffer."""
    logs = LogLines()
    configure_logging("debug", "json", stream=logs.file)
    try:
        yield logs
    finally:
        configure_logging("warning", "json")  # as tests/conftest.py leaves it


# --- a relay that can refuse connections -----------------------------------------------------


class Relay:
    """A TCP relay on loopback, used as one account's HTTP `proxy` to the simulator.

    Plain-HTTP proxying is forwarding the request as is, so a byte relay will do. Its
    upstream connections come from 127.0.0.2: the simulator counts that egress apart.
    While off, its port refuses connections.
    """

    SOURCE_IP = "127.0.0.2"

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on(self) -> None:
        assert self._listener is None
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.02)
        self._spawn(self._accept, self._listener, self._stop)

    def off(self) -> None:
        """Stop listening (new connections are refused) and cut every relayed connection."""
        self._stop.set()
        with self._lock:
            threads, self._threads = self._threads, []
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)
        for sock in sockets:
            sock.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="relay", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, source_address=(self.SOURCE_IP, 0))
            except OSError:
                client.close()
                continue
            with self._lock:
                if stop.is_set():  # off() has taken the sockets: this one must not outlive it
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


# --- the budget, from the server's side ------------------------------------------------------


def weight_by_ip(records: Iterable[RequestRecord]) -> dict[str, list[tuple[float, int]]]:
    """(arrival time, weight) of every request, by client IP, weight by path (not by
    what the simulator charged: a faulted request counts too)."""
    found: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for r in records:
        found[r.client_ip].append((r.time, PATH_WEIGHTS.get(r.path, 0)))
    return {ip: sorted(spent) for ip, spent in found.items()}


def budget_excesses(
    spent: list[tuple[float, int]], per_minute: float, *, slack: int = 80
) -> list[str]:
    """Windows in which the spend exceeds the budget: over 60 s at most `per_minute`, and
    over 1, 5 and 15 s at most the same rate plus `slack` (two refreshes: the pacing lets
    one reservation start at once, and a refresh's second request may trail)."""
    problems = []
    for window in (1.0, 5.0, 15.0, 60.0):
        allowed = per_minute if window == 60.0 else per_minute * window / 60 + slack
        total, j = 0, 0
        for i, (start, _) in enumerate(spent):
            while j < len(spent) and spent[j][0] < start + window:
                total += spent[j][1]
                j += 1
            if total > allowed:
                problems.append(f"{total} weight in the {window:g} s from {start:.3f}")
            total -= spent[i][1]
    return problems


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def request_times(
    records: Iterable[RequestRecord], account: str, path: str = "/papi/v1/balance"
) -> list[float]:
    return [r.time for r in records if r.account == account and r.path == path]


def secret_forms(value: str | bytes) -> list[str]:
    """A secret as it could leak: itself, hex, base64 (standard and URL-safe), and its
    first and last 16 characters (a truncated preview)."""
    raw = value.encode() if isinstance(value, str) else value
    forms = [
        raw.decode("latin-1"),
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    ]
    forms += [f[:16] for f in forms if len(f) >= 24] + [f[-16:] for f in forms if len(f) >= 24]
    return [f for f in forms if len(f) >= 12]
