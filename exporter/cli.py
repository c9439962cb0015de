"""The command line: flags (or BINANCE_PM_EXPORTER_* variables), wiring and signals."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from exporter import __version__
from exporter.app import Exporter
from exporter.budget import shard_limits
from exporter.collectors import weight_of
from exporter.config import Config, ConfigError, load_config, parse_config
from exporter.http import ServerLimits, parse_listen_address
from exporter.logs import FORMATS, LEVELS, configure_logging
from exporter.serve import serve_http
from exporter.shard import Shard, ShardError, parse_shard
from exporter.storage import StateFile
from exporter.summary import check_budget, summarize
from exporter.watchdog import ShutdownWatchdog
from exporter.webconfig import WebConfigError, WebConfigFile

if TYPE_CHECKING:
    from exporter.demo import NegativeEpisodes

DEFAULT_PORT = 9745
#: the demo serves this machine only, unless --web.listen-address says otherwise
DEMO_LISTEN_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
ENV_PREFIX = "BINANCE_PM_EXPORTER_"
EXIT_USAGE = 2
#: how long a thread may run while another waits for the GIL (CPython's default: 5 ms). The
#: pollers' loop shares it with the HTTP threads: under a scrape flood each of its
#: wake-ups waited up to this long for every thread ahead of it (bench/README.md, issue 20)
SWITCH_INTERVAL_SECONDS = 0.001
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _EarlySignals:
    """SIGTERM, SIGINT and SIGHUP held from before the server listens until the loop's
    handlers take over: one in between (a rollout stopping a pod that has just started, a
    reload right after start) killed the process by the signal's default action, with no
    clean stop (exit -15) or no reload (SIGHUP's default ends the process too)."""

    def __init__(self) -> None:
        self.arrived: list[int] = []
        self._before = {
            signum: signal.signal(signum, self._hold) for signum in (*_STOP_SIGNALS, signal.SIGHUP)
        }

    def _hold(self, signum: int, frame: object) -> None:
        self.arrived.append(signum)

    def stops(self) -> list[int]:
        return [signum for signum in self.arrived if signum in _STOP_SIGNALS]

    def restore(self) -> None:
        """The handlers from before (the defaults, in the command)."""
        for signum, handler in self._before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


log = structlog.get_logger("exporter")


def env_name(flag: str) -> str:
    """`--web.listen-address` -> `BINANCE_PM_EXPORTER_WEB_LISTEN_ADDRESS`."""
    return ENV_PREFIX + flag.lstrip("-").replace(".", "_").replace("-", "_").upper()


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace(".", "_").replace("-", "_")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    defaults = ServerLimits()
    parser = argparse.ArgumentParser(
        prog="binance-pm-exporter",
        description="Prometheus exporter for Binance Portfolio Margin accounts. Every flag "
        f"can also be set as an environment variable {ENV_PREFIX}<FLAG> "
        "(e.g. BINANCE_PM_EXPORTER_CONFIG_FILE); the flag wins.",
    )

    def option(
        flag: str, default: str | None, help: str, *, shown: str | None = None, **kwargs: Any
    ) -> None:
        """A flag whose help ends with its built-in default (``shown`` when that is None)
        and its environment variable."""
        assert default is not None or shown is not None, f"{flag}: say what its default is"
        parser.add_argument(
            flag,
            dest=_dest(flag),
            default=environ.get(env_name(flag), default),
            help=f"{help} (default: {default if shown is None else shown}; env {env_name(flag)})",
            **kwargs,
        )

    def switch(flag: str, help: str) -> None:
        value = environ.get(env_name(flag), "").strip().lower()
        parser.add_argument(
            flag,
            dest=_dest(flag),
            action="store_true",
            default=value in ("1", "true", "yes", "on"),
            help=f"{help} (default: off; env {env_name(flag)}=true)",
        )

    option("--config.file", "config.yaml", "path of the YAML config", metavar="PATH")
    option(
        "--web.listen-address",
        None,
        "address to serve /metrics on",
        shown=f":{DEFAULT_PORT}, every address; with --demo, {DEMO_LISTEN_ADDRESS}",
        metavar="HOST:PORT",
    )
    option(
        "--web.config.file",
        None,
        "exporter-toolkit web config for TLS and basic auth",
        shown="none, plain HTTP without auth",
        metavar="PATH",
    )
    option(
        "--web.max-connections",
        str(defaults.max_connections),
        "connections served at once (also capped by the open-files limit); past it the "
        "connection that has waited longest for its request is dropped",
        metavar="N",
    )
    option(
        "--web.max-requests",
        str(defaults.max_requests),
        "/metrics requests in flight; more are answered 503",
        metavar="N",
    )
    option(
        "--web.read-header-timeout",
        f"{defaults.read_header_timeout:g}",
        "seconds a client has for its request line and headers in total (and the keep-alive "
        "idle limit); slower clients are dropped unserved",
        metavar="SECONDS",
    )
    option(
        "--web.max-header-bytes",
        str(defaults.max_header_bytes),
        "bytes of request line and headers; more are answered 431",
        metavar="BYTES",
    )
    option("--log.level", "info", "log level", choices=LEVELS)
    option(
        "--log.format",
        None,
        "json or console",
        shown="json, or console when stderr is a terminal",
        choices=FORMATS,
    )
    option(
        "--shard",
        "0/1",
        "poll only this replica's share of the accounts: INDEX/TOTAL (0-based), or "
        "NAME-ORDINAL/TOTAL to take INDEX from a StatefulSet pod name such as "
        "binance-pm-exporter-2; each shard spends budget.share / TOTAL",
        metavar="INDEX/TOTAL",
    )
    option(
        "--storage.path",
        None,
        "directory to keep the last snapshot in, so that a restart serves the last values at once",
        shown="none, off",
        metavar="DIR",
    )
    switch("--check-config", "validate the config, print a summary without secrets, and exit")
    switch(
        "--web.enable-lifecycle",
        "serve POST /-/reload (reload the config, as SIGHUP does; behind basic auth when on)",
    )
    switch("--demo", "poll a bundled simulator of the PM API with synthetic accounts; no keys")
    parser.add_argument("--version", action="version", version=f"binance-pm-exporter {__version__}")
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    args = build_parser(environ).parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        host, port = parse_listen_address(listen_address(args))
    except ValueError as exc:
        return _usage_error(f"--web.listen-address: {exc}")
    try:
        limits = _limits(args)
    except ValueError as exc:
        return _usage_error(str(exc))
    try:
        shard = parse_shard(args.shard)
    except ShardError as exc:
        return _usage_error(f"--shard: {exc}")
    web_config_file = args.web_config_file
    try:
        web_config = WebConfigFile(Path(web_config_file)) if web_config_file else None
    except WebConfigError as exc:
        return _usage_error(f"--web.config.file: {exc}")

    episodes = _demo_episodes() if args.demo else None
    with _config(args, environ, episodes) as config:
        if config is None:
            return EXIT_USAGE
        problem = _shard_problem(config, shard)
        if problem is not None:
            return _usage_error(problem)
        if args.check_config:
            print(summarize(config, shard))
            return 0
        storage = StateFile(Path(args.storage_path)) if args.storage_path else None
        load = (
            None if args.demo else partial(_reload_config, Path(args.config_file), environ, shard)
        )
        exporter = Exporter(config, shard=shard, storage=storage, load=load)
        open_files = raise_open_files_limit()
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        early = _EarlySignals()
        try:
            try:
                server = serve_http(
                    exporter, host, port, web_config, limits, lifecycle=args.web_enable_lifecycle
                )
            except OSError as exc:
                return _usage_error(f"--web.listen-address: cannot listen on {host}:{port}: {exc}")
            log.info(
                "listening",
                address=f"{host}:{server.port}",
                tls=bool(web_config and web_config.current.ssl_context),
                max_connections=server.max_connections,
                open_files_limit=open_files,
            )
            try:
                asyncio.run(
                    _run_until_signalled(exporter, early, demo=args.demo, episodes=episodes)
                )
            finally:
                server.close()
        finally:
            early.restore()
        log.info("stopped")
    return 0


def _limits(args: argparse.Namespace) -> ServerLimits:
    """The server limits from the --web.* flags; ValueError names the flag."""
    values: dict[str, float] = {}
    for name, kind in (
        ("max_connections", int),
        ("max_requests", int),
        ("read_header_timeout", float),
        ("max_header_bytes", int),
    ):
        flag = "--web." + name.replace("_", "-")
        raw = getattr(args, f"web_{name}")
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"{flag}: not a number: {raw!r}") from None
        if not 0 < value < float("inf"):
            raise ValueError(f"{flag}: must be positive: {raw!r}")
        values[name] = value
    return ServerLimits(**values)  # type: ignore[arg-type]


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one, as Go programs do at start (node_exporter
    too): the HTTP server's connection cap follows it. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # e.g. above fs.nr_open: keep what we have
            pass
    return soft


def listen_address(args: argparse.Namespace) -> str:
    """--web.listen-address (or its variable); unset, every address, but this machine only
    in demo mode."""
    if args.web_listen_address is not None:
        return str(args.web_listen_address)
    return DEMO_LISTEN_ADDRESS if args.demo else f":{DEFAULT_PORT}"


def _demo_episodes() -> NegativeEpisodes:
    from exporter.demo import NegativeEpisodes  # noqa: PLC0415 - demo only

    return NegativeEpisodes()


@contextlib.contextmanager
def _config(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    episodes: NegativeEpisodes | None = None,
) -> Iterator[Config | None]:
    """The validated config (None after printing its problems); in demo mode, the simulator's
    (its negative-balance episodes told to `episodes`)."""
    if args.demo:
        from exporter.simulator.demo import start_demo  # noqa: PLC0415 - demo only

        simulator, data = start_demo(episodes=episodes)
        log.info("demo_simulator_started", url=simulator.url)
        try:
            yield parse_config(data, environ={}, base_dir=Path.cwd())
        finally:
            simulator.stop()
        return
    try:
        config = load_checked(Path(args.config_file), environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        yield None
        return
    yield config


def load_checked(path: Path, environ: Mapping[str, str]) -> Config:
    """The config file and its account files, and the budget check; every problem names
    its file once (``config.yaml: budget.share: ...``). Raises ConfigError."""
    config = load_config(path, environ)
    try:
        check_budget(config)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {problem}" for problem in exc.problems]) from None
    return config


def _shard_problem(config: Config, shard: Shard) -> str | None:
    per_shard = shard_limits(config.budget, shard.total).per_minute
    weight = weight_of(config.collect.switches())
    if per_shard >= weight:
        return None
    return (
        f"--shard: each of {shard.total} shards may spend budget B / {shard.total} = "
        f"{per_shard:g} weight/min, less than one account refresh ({weight}); "
        "use fewer shards or a larger budget.share"
    )


def _reload_config(path: Path, environ: Mapping[str, str], shard: Shard) -> Config:
    """The config file again, checked as at start: every field, secret file, key, the budget
    and the shard's share of it. Raises ConfigError (problems prefixed as at start)."""
    config = load_checked(path, environ)
    problem = _shard_problem(config, shard)
    if problem is not None:
        raise ConfigError([problem])
    return config


async def _run_until_signalled(
    exporter: Exporter,
    early: _EarlySignals,
    *,
    demo: bool = False,
    episodes: NegativeEpisodes | None = None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    watchdog = ShutdownWatchdog(activity=exporter.activity)

    def on_stop_signal(signum: int, frame: object) -> None:
        # A plain handler, not the loop's: it runs even while the loop cannot, and arms
        # the watchdog before anything else may get stuck.
        watchdog.arm(signal.Signals(signum).name)
        loop.call_soon_threadsafe(_stop, stop, signum)

    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, on_stop_signal)
    for held in early.stops()[:1]:  # one arrived before: stop as soon as running
        on_stop_signal(held, None)
    try:
        reload_now = signal.SIGHUP in early.arrived
        await _run(exporter, stop, demo=demo, episodes=episodes, reload_now=reload_now)
    finally:  # the watchdog, once armed, stays armed; a second signal now acts at once
        early.restore()


async def _run(
    exporter: Exporter,
    stop: asyncio.Event,
    *,
    demo: bool,
    episodes: NegativeEpisodes | None,
    reload_now: bool = False,
) -> None:
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[str | None]] = set()

    def reload() -> None:
        log.info("reload_requested", signal="SIGHUP")
        task = asyncio.create_task(exporter.areload())
        reloads.add(task)  # a reference until done: the loop keeps only weak ones
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    if reload_now:  # a SIGHUP held from before the loop ran
        reload()
    if not demo:
        await exporter.run(stop)
        return
    from exporter.demo import log_usd_totals  # noqa: PLC0415 - demo only

    tasks = [asyncio.create_task(log_usd_totals(exporter.store, exporter.price_store))]
    if episodes is not None:
        tasks.append(asyncio.create_task(episodes.watch(exporter.store)))
    try:
        await exporter.run(stop)
    finally:
        for task in tasks:
            task.cancel()


def _stop(stop: asyncio.Event, signum: int) -> None:
    log.info("stopping", signal=signal.Signals(signum).name)
    stop.set()


def _usage_error(message: str) -> int:
    print(f"binance-pm-exporter: {message}", file=sys.stderr)
    return EXIT_USAGE
