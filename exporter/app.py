"""Assembles a running exporter from a config: budgets, pollers, snapshot, metrics.

A reload (SIGHUP, or `Exporter.reload()`) turns a new config into the same parts,
keeping what did not change: an egress (route) that stays keeps its budget, its
client and its poller, and an account that stays keeps its snapshot, schedule and
backoff.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from types import MappingProxyType

import httpx
import structlog
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from exporter.binance.client import FAPI_TIME_PATH, SPOT_TIME_PATH, BinanceClient, Credentials
from exporter.binance.signing import make_signer
from exporter.binance.stream import DEFAULT_TIMINGS, Connect, StreamTimings, websocket_connect
from exporter.budget import BudgetLimits, WeightBudget, refresh_interval, shard_limits
from exporter.clock import SYSTEM_CLOCK, Clock
from exporter.clocksync import ClockSync, TimeSource, fapi_budget_limits
from exporter.collector import families_of
from exporter.collectors import enabled, refresh_weight, registered
from exporter.config import AccountConfig, Config, ConfigError, PrivateKey
from exporter.exposition import CachedExposition
from exporter.poller import BACKOFF_CAP_SECONDS, EgressPoller, PollSettings, Target
from exporter.pricemetrics import PriceCollector
from exporter.prices import PriceBook, PriceSource, PriceStore, price_budget_limits
from exporter.processmetrics import register_process_metrics
from exporter.route import Route
from exporter.selfmetrics import (
    BudgetCollector,
    BuildInfoCollector,
    Instruments,
    ReloadCollector,
    ReloadStatus,
    StreamHealth,
)
from exporter.shard import WHOLE, Shard
from exporter.snapshot import AccountMeta, AccountSnapshot, SnapshotStore
from exporter.storage import StateFile
from exporter.streams import AccountStreams

log = structlog.get_logger("exporter")

# `_created` series of the counters would double the health metrics for no use.

#: the web config's reload metrics: binance_pm_web_config_last_reload_*
WEB_CONFIG_NAMES = ("web_config", "web config")

#: how long in-flight requests may take to finish after a stop signal
SHUTDOWN_GRACE_SECONDS = 5.0
#: a reload still reading its files after this long fails (its thread is left behind)
RELOAD_TIMEOUT = 30.0

#: reads and validates the config (file, secrets, budget, shard); raises ConfigError
ConfigLoader = Callable[[], Config]


@dataclass(frozen=True)
class _Plan:
    """What a config means for this replica: its accounts, grouped by route."""

    config: Config
    accounts: list[AccountConfig]
    limits: BudgetLimits
    #: route -> its accounts, in the order of the route labels
    groups: dict[Route, list[AccountConfig]]
    settings: dict[Route, PollSettings]


def _plan(config: Config, shard: Shard, backoff_cap: float) -> _Plan:
    accounts = shard.select(config.accounts, lambda a: a.name)
    limits = shard_limits(config.budget, shard.total)
    switches = config.collect.switches()
    collectors = enabled(switches)
    weight = refresh_weight(collectors)
    by_route: dict[Route, list[AccountConfig]] = {}
    for account in accounts:
        by_route.setdefault(account.route, []).append(account)
    groups = dict(sorted(by_route.items(), key=lambda group: group[0].label))
    settings = {
        route: PollSettings(
            allows_asset=config.collect.assets.allows,
            interval=refresh_interval(
                len(members), weight, limits, config.budget.min_interval_seconds
            ),
            backoff_cap=backoff_cap,
            trigger_interval=config.stream.min_refresh_interval_seconds,
            collectors=collectors,
            switches=MappingProxyType(switches),
        )
        for route, members in groups.items()
    }
    return _Plan(config, accounts, limits, groups, settings)


@dataclass
class _Egress:
    """One route's running parts."""

    budget: WeightBudget
    poller: EgressPoller
    task: asyncio.Task[None] | None = None


class Exporter:
    """One exporter: a poller per egress IP, the snapshot they share, and its metrics."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
        shard: Shard = WHOLE,
        storage: StateFile | None = None,
        load: ConfigLoader | None = None,
        backoff_cap: float = BACKOFF_CAP_SECONDS,
        stream_timings: StreamTimings = DEFAULT_TIMINGS,
        transport: httpx.AsyncBaseTransport | None = None,
        stream_connect: Connect = websocket_connect,
    ) -> None:
        self.shard = shard
        #: every REST client's transport instead of its route's (tests: the simulator
        #: in-process, exporter/simulator/transport.py); None in production
        self._transport = transport
        self.storage = storage
        #: the one clock's two halves, handed to every part that reads the time or waits
        self._clock = clock.now
        self._sleep = clock.sleep
        self._load = load
        self._backoff_cap = backoff_cap
        plan = self._plan = _plan(config, shard, backoff_cap)
        #: each account's settings and the target made from them
        self._targets: dict[str, tuple[AccountConfig, Target]] = {}
        #: what /metrics serves after the snapshot's exposition: the live self-metrics,
        #: rendered per scrape
        self.registry = CollectorRegistry(auto_describe=True)
        self.instruments = Instruments(self.registry)
        #: budgets of the other hosts' pools per route ("fapi:<route>", "spot:<route>"):
        #: the server time's, and the price source's (one spot budget per route for both)
        self._host_budgets: dict[str, WeightBudget] = {}
        self.reload_status = ReloadStatus(successful=True, last_success=clock.now())
        names = {a.name for a in plan.accounts}
        saved = storage.load(names) if storage is not None else {}
        for reason, count in storage.dropped.items() if storage is not None else ():
            self.instruments.dropped.labels("state_file", reason).inc(count)
        self.store = SnapshotStore(
            _with_meta(
                _under(saved[a.name], plan.settings[a.route])
                if a.name in saved
                else AccountSnapshot(a.name, plan.settings[a.route].interval),
                a,
            )
            for a in sorted(plan.accounts, key=lambda a: a.name)
        )
        #: the user data streams' health, fed by the stream clients (None: disabled); the
        #: series of every account configured at start (a reload adds none: see README)
        self.stream_health = (
            StreamHealth(a.name for a in plan.accounts) if config.stream.enabled else None
        )
        self._egresses: dict[Route, _Egress] = {
            route: self._egress(
                route,
                # Accounts with nothing to show (not restored) first: readiness sooner.
                sorted(accounts, key=lambda a: a.name in saved),
                plan,
                WeightBudget(route.label, plan.limits, clock=clock.now, sleep=clock.sleep),
            )
            for route, accounts in plan.groups.items()
        }
        #: one user data stream per account, its events turned into refreshes (None: off)
        self.streams = (
            AccountStreams(
                stream_url=config.binance.stream_url,
                health=self.stream_health,
                clock=clock.now,
                sleep=clock.sleep,
                timings=stream_timings,
                connect=stream_connect,  # tests: exporter/simulator/memstream.py
            )
            if self.stream_health is not None
            else None
        )
        #: the spot prices, read by the price metrics at scrape time
        self.price_store = PriceStore(PriceBook(frozenset(config.prices.usd_assets)))
        self.prices = self._price_source(config)
        self.registry.register(BudgetCollector(lambda: [b.figures() for b in self._all_budgets]))
        self.registry.register(ReloadCollector(self.reload_status, "config", "config"))
        self.registry.register(BuildInfoCollector())
        register_process_metrics(self.registry)
        if self.prices is not None:
            self.registry.register(PriceCollector(self.store, self.price_store))
        if self.stream_health is not None:
            self.registry.register(self.stream_health)
        #: the snapshot's families, rendered once per snapshot change
        self.exposition = CachedExposition(
            self.store, families_of(enabled(config.collect.switches()))
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._crash: BaseException | None = None
        self._reload_lock = asyncio.Lock()
        self._reloading: asyncio.Future[str | None] | None = None
        #: reloads read files and load keys here, one at a time, off the pollers' loop
        self._reload_thread = ThreadPoolExecutor(1, thread_name_prefix="config-reload")
        #: pollers a reload removed, finishing their in-flight refreshes
        self._retiring: set[asyncio.Task[None]] = set()

    # --- what is running -------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._plan.config

    @property
    def accounts(self) -> list[AccountConfig]:
        """The accounts this replica polls: all of them, or its shard's share."""
        return self._plan.accounts

    @property
    def pollers(self) -> list[EgressPoller]:
        return [egress.poller for egress in self._egresses.values()]

    @property
    def budgets(self) -> list[WeightBudget]:
        return [egress.budget for egress in self._egresses.values()]

    @property
    def _all_budgets(self) -> list[WeightBudget]:
        """The routes' budgets and the other hosts' (the time sync's, the price source's)."""
        return self.budgets + list(self._host_budgets.values())

    def _host_budget(self, host: str, route: Route) -> WeightBudget:
        """The budget of `host`'s pool ("fapi" or "spot") on `route`, made once."""
        name = f"{host}:{route.label}"
        budget = self._host_budgets.get(name)
        if budget is None:
            high_water = self._plan.config.budget.ip_high_water
            limits = (
                fapi_budget_limits(high_water)
                if host == "fapi"
                else price_budget_limits(high_water)
            )
            budget = WeightBudget(name, limits, clock=self._clock, sleep=self._sleep)
            # a new dict, not an insert: scrapes iterate the current one from another thread
            self._host_budgets = {**self._host_budgets, name: budget}
        return budget

    def _clock_sync(self, route: Route, config: Config) -> ClockSync:
        """The server time for the accounts on `route`, through that route: the futures
        host's, else the spot host's (unless prices are off: the exporter then never talks
        to the spot host)."""
        sources = [
            TimeSource(
                config.binance.futures_url + FAPI_TIME_PATH,
                "fapi_time",
                self._host_budget("fapi", route),
            )
        ]
        if config.prices.enabled:
            sources.append(
                TimeSource(
                    config.prices.base_url + SPOT_TIME_PATH,
                    "spot_time",
                    self._host_budget("spot", route),
                )
            )
        return ClockSync(sources, self.instruments, egress=route.label)

    @property
    def poller_of(self) -> dict[str, EgressPoller]:
        """Each account's poller: `trigger` and `apply_risk` for its stream's events."""
        return {
            target.name: egress.poller
            for egress in self._egresses.values()
            for target in egress.poller.targets
        }

    def _price_source(self, config: Config) -> PriceSource | None:
        """The spot price source, on a budget of its own (the spot API's weight pool)."""
        settings = config.prices
        if not settings.enabled:
            return None
        return PriceSource(
            make_client=partial(
                BinanceClient,
                base_url=settings.base_url,
                timeout_seconds=config.binance.timeout_seconds,
                recv_window_ms=config.binance.recv_window_ms,
                clock=self._clock,
                route=settings.route,
                transport=self._transport,
            ),
            budget=self._host_budget("spot", settings.route),
            store=self.price_store,
            instruments=self.instruments,
            interval=settings.interval_seconds,
            held=lambda: self.store.current.assets,
            clock=self._clock,
            sleep=self._sleep,
        )

    def _egress(
        self, route: Route, accounts: Iterable[AccountConfig], plan: _Plan, budget: WeightBudget
    ) -> _Egress:
        binance = plan.config.binance
        poller = EgressPoller(
            targets=[self._target(a) for a in accounts],
            make_client=partial(
                BinanceClient,
                base_url=binance.base_url,
                timeout_seconds=binance.timeout_seconds,
                recv_window_ms=binance.recv_window_ms,
                clock=self._clock,
                route=route,
                transport=self._transport,
            ),
            budget=budget,
            store=self.store,
            instruments=self.instruments,
            settings=plan.settings[route],
            clock=self._clock,
            sleep=self._sleep,
            stream=self.stream_health,
            clock_sync=self._clock_sync(route, plan.config),
        )
        return _Egress(budget, poller)

    def _target(self, account: AccountConfig) -> Target:
        """The account's target: the one it has while its settings stay the same (it keeps
        its schedule and backoff), else a new one."""
        known = self._targets.get(account.name)
        if known is None or not same(known[0], account):
            known = self._targets[account.name] = (account, _target(account))
        return known[1]

    # --- serving and polling ---------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set, then let in-flight requests finish within the grace."""
        self._loop, self._stop = asyncio.get_running_loop(), stop
        for egress in self._egresses.values():
            self._start(egress)
        others = []  # the storage's writer and the price source: they must not end either
        if self.storage is not None:
            others.append(
                self.storage.keep_written(self.store, clock=self._clock, sleep=self._sleep)
            )
        if self.prices is not None:
            others.append(self.prices.run())
        helpers = [asyncio.create_task(coroutine) for coroutine in others]
        for task in helpers:
            task.add_done_callback(self._died)
        self._sync_streams()
        self._log_polling("polling_started")
        await stop.wait()
        if self.streams is not None:  # each deletes its listenKey, through its route's client
            await self.streams.close(SHUTDOWN_GRACE_SECONDS)
        tasks = [e.task for e in self._egresses.values() if e.task is not None] + helpers
        for task in tasks:
            task.remove_done_callback(self._died)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(p.drain(SHUTDOWN_GRACE_SECONDS) for p in self.pollers), *self._retiring
        )
        if self.prices is not None:
            await self.prices.aclose()
        if self.storage is not None:
            self.storage.write(self.store.current, self._clock())
        self._loop = None  # no more reloads
        if self._crash is not None:  # a poller loop must never die on its own
            raise self._crash

    def _sync_streams(self) -> None:
        """A user data stream for every account polled now, none for the others."""
        if self.streams is not None:
            self.streams.sync(
                (route, egress.budget, egress.poller, egress.poller.targets)
                for route, egress in self._egresses.items()
            )

    def _start(self, egress: _Egress) -> None:
        egress.task = asyncio.create_task(egress.poller.run(), name="poller")
        egress.task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        self._crash = task.exception() or RuntimeError(f"task {task.get_name()} ended")
        assert self._stop is not None
        self._stop.set()

    def _log_polling(self, event: str, **more: object) -> None:
        if not self.accounts:
            log.warning(
                "no_accounts_in_shard", shard=str(self.shard), configured=len(self.config.accounts)
            )
        log.info(
            event,
            accounts=len(self.accounts),
            shard=str(self.shard),
            egresses=[b.egress for b in self.budgets],
            intervals=[p.settings.interval for p in self.pollers],
            **more,
        )

    def activity(self) -> list[str]:
        """What the exporter is doing that may hold up its shutdown (for the watchdog;
        read from another thread: plain reads only)."""
        doing = []
        if self._reload_lock.locked():
            doing.append("config reload")
        if self._retiring:
            doing.append(f"{len(self._retiring)} retired pollers draining")
        if self._stop is not None and self._stop.is_set():
            doing.append("stopping")
        return doing

    # --- reloading -------------------------------------------------------------------

    def reload(self, timeout: float = 60.0) -> str | None:
        """Reload from another thread than the exporter's loop (the HTTP `/-/reload`): as
        `areload`, waiting up to `timeout` seconds for it."""
        if self._loop is None:
            return "the exporter is not running"
        future = asyncio.run_coroutine_threadsafe(self.areload(), self._loop)
        return future.result(timeout)

    async def areload(self) -> str | None:
        """Re-read the config and every secret file; when all of it is valid, run it and
        return None. Otherwise keep the running config and return the problem (one line,
        logged, and `binance_pm_config_last_reload_successful` 0). A request made while a
        reload runs (SIGHUP or HTTP) shares that run and its verdict."""
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.ensure_future(self._reload_once())
        return await asyncio.shield(self._reloading)

    async def _reload_once(self) -> str | None:
        async with self._reload_lock:
            if self._load is None:
                log.warning("reload_failed", error="no config file to reload (--demo)")
                return "no config file to reload (--demo)"
            try:
                # Reading files and loading keys takes a while: in the reloads' own thread,
                # never the pollers' loop; a read that never ends must not hold the lock
                # (and every later reload): its thread is left behind and replaced.
                loop = asyncio.get_running_loop()
                reading = loop.run_in_executor(self._reload_thread, self._load)
                try:
                    config = await asyncio.wait_for(asyncio.shield(reading), RELOAD_TIMEOUT)
                except TimeoutError:
                    self._reload_thread.shutdown(wait=False)
                    self._reload_thread = ThreadPoolExecutor(1, thread_name_prefix="config-reload")
                    raise ConfigError(
                        [f"reading the config took over {RELOAD_TIMEOUT:g} s; not applied"]
                    ) from None
            except ConfigError as exc:
                error = "; ".join(exc.problems)
                self.reload_status.successful = False
                log.error("reload_failed", error=error)  # noqa: TRY400 - no traceback to show
                return error
            before = {a.name: a for a in self.accounts}
            self._apply(_plan(config, self.shard, self._backoff_cap))
            after = {a.name: a for a in self.accounts}
            self.reload_status.successful = True
            self.reload_status.last_success = self._clock()
            self._log_polling(
                "config_reloaded",
                added=sorted(after.keys() - before.keys()),
                removed=sorted(before.keys() - after.keys()),
                changed=sorted(
                    n for n in after.keys() & before.keys() if not same(before[n], after[n])
                ),
            )
            return None

    def _apply(self, plan: _Plan) -> None:
        """Run `plan` in place of the current one; in the loop, between two awaits."""
        # new client settings, or a new spot host (the server time's second source)
        new_clients = plan.config.binance != self._plan.config.binance or (
            plan.config.prices.enabled,
            plan.config.prices.base_url,
        ) != (self._plan.config.prices.enabled, self._plan.config.prices.base_url)
        self.exposition.set_families(families_of(enabled(plan.config.collect.switches())))
        self.store.rebuild(partial(_snapshots, plan))
        old = self._egresses
        egresses = {}
        for route, accounts in plan.groups.items():
            current = old.get(route)
            if current is not None:
                current.budget.set_limits(plan.limits)
            if current is not None and not new_clients:
                current.poller.update([self._target(a) for a in accounts], plan.settings[route])
                egresses[route] = current
                continue
            # A new route, or new client settings: a new poller (and client), on the
            # route's budget if it had one (its log keeps the last minute's spending).
            budget = (
                current.budget
                if current is not None
                else WeightBudget(route.label, plan.limits, clock=self._clock, sleep=self._sleep)
            )
            egresses[route] = self._egress(route, accounts, plan, budget)
        for route, egress in old.items():
            if egresses.get(route) is not egress:
                self._retire(egress)
        self._plan = plan
        self._egresses = egresses  # one assignment: scrapes see the old set or the new
        names = {a.name for a in plan.accounts}
        self._targets = {n: known for n, known in self._targets.items() if n in names}
        if self._loop is not None:
            for egress in egresses.values():
                if egress.task is None:
                    self._start(egress)
            self._sync_streams()

    def _retire(self, egress: _Egress) -> None:
        if egress.task is not None:
            egress.task.remove_done_callback(self._died)
            egress.task.cancel()
        task = asyncio.create_task(egress.poller.drain(SHUTDOWN_GRACE_SECONDS), name="retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


def _snapshots(plan: _Plan, current: Mapping[str, AccountSnapshot]) -> Iterable[AccountSnapshot]:
    """The plan's accounts: kept ones with their snapshot (under the new settings), new ones
    empty; accounts not in the plan are left out, and their series leave /metrics."""
    for account in plan.accounts:
        settings = plan.settings[account.route]
        kept = current.get(account.name)
        if kept is None:
            yield _with_meta(AccountSnapshot(account.name, settings.interval), account)
        else:
            yield _with_meta(_under(kept, settings), account)


def meta_of(account: AccountConfig) -> AccountMeta:
    """The account's labels and thresholds as the snapshot carries them to /metrics."""
    return AccountMeta(
        labels=tuple(sorted(account.labels.items())),
        thresholds=tuple(account.thresholds.given().items()),
    )


def _with_meta(snapshot: AccountSnapshot, account: AccountConfig) -> AccountSnapshot:
    """`snapshot` with the account's config labels and thresholds (the same object when
    they did not change, so its rendered lines stay cached)."""
    meta = meta_of(account)
    return snapshot if meta == snapshot.meta else replace(snapshot, meta=meta)


def _under(snapshot: AccountSnapshot, settings: PollSettings) -> AccountSnapshot:
    """`snapshot` under `settings`: their interval, and each collector's part narrowed to
    their scope, or gone when the collector is off (the same object when nothing changes,
    so its rendered lines stay cached)."""
    polled = {c.name for c in settings.collectors}
    account = snapshot
    for collector in registered():
        part = collector.get(account)
        if part is None:
            continue
        kept = collector.narrow(part, settings.scope) if collector.name in polled else None
        if kept is not part:
            account = collector.put(account, kept)
    if not account.parts.keys() <= polled:  # the part of a collector no longer registered
        parts = {name: part for name, part in account.parts.items() if name in polled}
        account = replace(account, parts=MappingProxyType(parts))
    if account.refresh_interval != settings.interval:
        account = replace(account, refresh_interval=settings.interval)
    return account


def same(a: AccountConfig, b: AccountConfig) -> bool:
    """The same account settings: name, route and credentials (compared in constant time)."""
    return (
        a.name == b.name
        and a.route == b.route
        and _equal(_secret(a.api_key), _secret(b.api_key))
        and _equal(_secret(a.api_secret), _secret(b.api_secret))
        and _equal(_key(a.private_key), _key(b.private_key))
    )


def _secret(value: SecretStr | None) -> bytes | None:
    return None if value is None else value.get_secret_value().encode()


def _key(key: PrivateKey | None) -> bytes | None:
    if key is None:
        return None
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _equal(a: bytes | None, b: bytes | None) -> bool:
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a, b)


def _target(account: AccountConfig) -> Target:
    return Target(
        account.name,
        Credentials(account.api_key, make_signer(account.api_secret, account.private_key)),
    )
