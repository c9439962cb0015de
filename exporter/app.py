"""Assembles a running exporter from a config: budgets, pollers, snapshot, metrics, HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import structlog
from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.registry import Collector

from exporter.binance.client import BinanceClient, Credentials
from exporter.binance.signing import make_signer
from exporter.budget import WeightBudget, refresh_interval, shard_limits
from exporter.collector import SnapshotCollector
from exporter.config import AccountConfig, Config
from exporter.exposition import CachedExposition
from exporter.poller import EgressPoller, PollSettings, Target
from exporter.route import Route
from exporter.selfmetrics import BudgetCollector, BuildInfoCollector, Instruments
from exporter.server import ExporterApp, MetricsServer
from exporter.shard import WHOLE, Shard
from exporter.snapshot import AccountSnapshot, SnapshotStore
from exporter.storage import StateFile
from exporter.webconfig import WebConfig
from exporter.weights import refresh_weight

log = structlog.get_logger("exporter")

# `_created` series of the counters would double the health metrics for no use.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: how long in-flight requests may take to finish after a stop signal
SHUTDOWN_GRACE_SECONDS = 5.0


class Exporter:
    """One exporter: a poller per egress IP, the snapshot they share, and its metrics."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        shard: Shard = WHOLE,
        storage: StateFile | None = None,
    ) -> None:
        self.config = config
        self.shard = shard
        self.storage = storage
        self._clock = clock
        #: the accounts this replica polls: all of them, or its shard's share
        self.accounts = shard.select(config.accounts, lambda a: a.name)
        #: the live self-metrics, rendered per scrape
        self.live_registry = CollectorRegistry(auto_describe=True)
        limits = shard_limits(config.budget, shard.total)
        self.instruments = instruments = Instruments(self.live_registry)
        weight = refresh_weight(config.collect.account_info)
        # One client and one budget per route, built from the route itself.
        by_route: dict[Route, list[AccountConfig]] = {}
        for account in self.accounts:
            by_route.setdefault(account.route, []).append(account)
        groups = sorted(by_route.items(), key=lambda group: group[0].label)
        settings = {
            route: PollSettings(
                account_info=config.collect.account_info,
                allows_asset=config.collect.assets.allows,
                interval=refresh_interval(
                    len(accounts), weight, limits, config.budget.min_interval_seconds
                ),
            )
            for route, accounts in groups
        }
        saved = storage.load({a.name for a in self.accounts}) if storage is not None else {}
        self.store = SnapshotStore(
            _restore(saved[a.name], settings[a.route])
            if a.name in saved
            else AccountSnapshot(a.name, settings[a.route].interval)
            for a in sorted(self.accounts, key=lambda a: a.name)
        )
        self.budgets: list[WeightBudget] = []
        self.pollers: list[EgressPoller] = []
        for route, accounts in groups:
            budget = WeightBudget(route.label, limits, clock=clock)
            self.budgets.append(budget)
            self.pollers.append(
                EgressPoller(
                    # Accounts with nothing to show (not restored) first: readiness sooner.
                    targets=[_target(a) for a in sorted(accounts, key=lambda a: a.name in saved)],
                    make_client=partial(
                        BinanceClient,
                        base_url=config.binance.base_url,
                        timeout_seconds=config.binance.timeout_seconds,
                        recv_window_ms=config.binance.recv_window_ms,
                        clock=clock,
                        route=route,
                    ),
                    budget=budget,
                    store=self.store,
                    instruments=instruments,
                    settings=settings[route],
                    clock=clock,
                )
            )
        live: list[Collector] = [instruments.requests, instruments.duration]
        live += [BudgetCollector(self.budgets), BuildInfoCollector()]
        for collector in live[2:]:
            self.live_registry.register(collector)
        #: the snapshot's families, rendered once per snapshot change
        self.exposition = CachedExposition(self.store)
        #: everything, through prometheus_client: the reference /metrics must equal
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(SnapshotCollector(self.store))
        for collector in live:
            self.registry.register(collector)

    def serve_http(self, host: str, port: int, web: WebConfig | None = None) -> MetricsServer:
        """Serve /metrics and the other endpoints on host:port, with TLS and auth from `web`."""
        web = web or WebConfig()
        app = ExporterApp(self.live_registry, self.store, web, exposition=self.exposition)
        server = MetricsServer(app, host, port, web.ssl_context)
        server.start()
        return server

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set, then let in-flight requests finish within the grace."""
        tasks = [asyncio.create_task(p.run(), name="poller") for p in self.pollers]
        if self.storage is not None:
            tasks.append(
                asyncio.create_task(
                    self.storage.keep_written(self.store, clock=self._clock), name="storage"
                )
            )
        if not self.accounts:
            log.warning(
                "no_accounts_in_shard", shard=str(self.shard), configured=len(self.config.accounts)
            )
        log.info(
            "polling_started",
            accounts=len(self.accounts),
            shard=str(self.shard),
            egresses=[b.egress for b in self.budgets],
            intervals=[p.settings.interval for p in self.pollers],
        )
        stopped = asyncio.create_task(stop.wait())
        _done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(p.drain(SHUTDOWN_GRACE_SECONDS) for p in self.pollers))
        stopped.cancel()
        if self.storage is not None:
            self.storage.write(self.store.current, self._clock())
        for result in results:
            if isinstance(result, Exception):  # a poller loop must never die on its own
                raise result


def _restore(saved: AccountSnapshot, settings: PollSettings) -> AccountSnapshot:
    """A saved account under today's settings: its interval, assets and account info."""
    return replace(
        saved,
        refresh_interval=settings.interval,
        balances=tuple(b for b in saved.balances if settings.allows_asset(b.asset)),
        info=saved.info if settings.account_info else None,
    )


def _target(account: AccountConfig) -> Target:
    return Target(
        account.name,
        Credentials(account.api_key, make_signer(account.api_secret, account.private_key)),
    )
