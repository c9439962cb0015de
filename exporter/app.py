"""Assembles a running exporter from a config: budgets, pollers, snapshot, metrics, HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial

import structlog
from prometheus_client import CollectorRegistry

from exporter.binance.client import BinanceClient, Credentials
from exporter.binance.signing import make_signer
from exporter.budget import WeightBudget, refresh_interval, shard_limits
from exporter.config import AccountConfig, Config
from exporter.exposition import CachedExposition
from exporter.poller import BACKOFF_CAP_SECONDS, EgressPoller, PollSettings, Target
from exporter.pricemetrics import PriceCollector
from exporter.prices import PriceBook, PriceSource, PriceStore, price_budget_limits
from exporter.route import Route
from exporter.selfmetrics import BudgetCollector, BuildInfoCollector, Instruments, StreamHealth
from exporter.server import ExporterApp, MetricsServer, ServerLimits
from exporter.shard import WHOLE, Shard
from exporter.snapshot import AccountSnapshot, SnapshotStore
from exporter.streams import AccountStreams
from exporter.webconfig import WebConfig
from exporter.weights import refresh_weight

log = structlog.get_logger("exporter")

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
        backoff_cap: float = BACKOFF_CAP_SECONDS,
    ) -> None:
        self.config = config
        self.shard = shard
        #: the accounts this replica polls: all of them, or its shard's share
        self.accounts = shard.select(config.accounts, lambda a: a.name)
        #: what /metrics serves after the snapshot's exposition: the live self-metrics,
        #: rendered per scrape
        self.registry = CollectorRegistry(auto_describe=True)
        limits = shard_limits(config.budget, shard.total)
        self.instruments = instruments = Instruments(self.registry)
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
                backoff_cap=backoff_cap,
                trigger_interval=config.stream.min_refresh_interval_seconds,
            )
            for route, accounts in groups
        }
        self.store = SnapshotStore(
            AccountSnapshot(a.name, settings[a.route].interval)
            for a in sorted(self.accounts, key=lambda a: a.name)
        )
        #: the user data streams' health, fed by the stream clients (None: disabled)
        self.stream_health = (
            StreamHealth(a.name for a in self.accounts) if config.stream.enabled else None
        )
        #: one user data stream per account, its events turned into refreshes (None: off)
        self.streams = (
            AccountStreams(
                stream_url=config.binance.stream_url, health=self.stream_health, clock=clock
            )
            if self.stream_health is not None
            else None
        )
        self.budgets: list[WeightBudget] = []
        self.pollers: list[EgressPoller] = []
        #: each account's poller: `trigger` and `apply_risk` for its stream's events
        self.poller_of: dict[str, EgressPoller] = {}
        for route, accounts in groups:
            budget = WeightBudget(route.label, limits, clock=clock)
            self.budgets.append(budget)
            targets = [_target(a) for a in accounts]
            self.pollers.append(
                EgressPoller(
                    targets=targets,
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
                    stream=self.stream_health,
                )
            )
            self.poller_of.update((a.name, self.pollers[-1]) for a in accounts)
            if self.streams is not None:
                self.streams.add(route, budget, self.pollers[-1], targets)
        #: the spot prices, read by the price metrics at scrape time
        self.price_store = PriceStore(PriceBook(frozenset(config.prices.usd_assets)))
        self.prices = self._price_source(config, clock)
        budgets = self.budgets + ([self.prices.budget] if self.prices is not None else [])
        self.registry.register(BudgetCollector(budgets))
        self.registry.register(BuildInfoCollector())
        if self.prices is not None:
            self.registry.register(PriceCollector(self.store, self.price_store))
        if self.stream_health is not None:
            self.registry.register(self.stream_health)
        #: the snapshot's families, rendered once per snapshot change
        self.exposition = CachedExposition(self.store)

    def _price_source(self, config: Config, clock: Callable[[], float]) -> PriceSource | None:
        """The spot price source, on a budget of its own (the spot API's weight pool)."""
        settings = config.prices
        if not settings.enabled:
            return None
        limits = price_budget_limits(config.budget.ip_high_water)
        return PriceSource(
            make_client=partial(
                BinanceClient,
                base_url=settings.base_url,
                timeout_seconds=config.binance.timeout_seconds,
                recv_window_ms=config.binance.recv_window_ms,
                clock=clock,
                route=settings.route,
            ),
            budget=WeightBudget(f"spot:{settings.route.label}", limits, clock=clock),
            store=self.price_store,
            instruments=self.instruments,
            interval=settings.interval_seconds,
            held=lambda: self.store.current.assets,
            clock=clock,
        )

    def serve_http(
        self,
        host: str,
        port: int,
        web: WebConfig | None = None,
        limits: ServerLimits | None = None,
    ) -> MetricsServer:
        """Serve /metrics and the other endpoints on host:port, with TLS and auth from `web`."""
        web = web or WebConfig()
        app = ExporterApp(self.registry, self.store, web, exposition=self.exposition)
        server = MetricsServer(app, host, port, web.ssl_context, limits)
        server.start()
        return server

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set, then let in-flight requests finish within the grace."""
        tasks = [asyncio.create_task(p.run(), name="poller") for p in self.pollers]
        if self.prices is not None:
            tasks.append(asyncio.create_task(self.prices.run(), name="prices"))
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
        # Not among `tasks`: a stream ending (or none configured) does not stop the polling.
        streams = asyncio.create_task(self.streams.run(), name="streams") if self.streams else None
        stopped = asyncio.create_task(stop.wait())
        _done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if streams is not None and self.streams is not None:
            # Each stream deletes its listenKey on the way out, through its route's client.
            await self.streams.close()
            await asyncio.wait([streams], timeout=SHUTDOWN_GRACE_SECONDS)
            streams.cancel()
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(p.drain(SHUTDOWN_GRACE_SECONDS) for p in self.pollers))
        if self.prices is not None:
            await self.prices.aclose()
        stopped.cancel()
        for result in results:
            if isinstance(result, Exception):  # a poller loop must never die on its own
                raise result


def _target(account: AccountConfig) -> Target:
    return Target(
        account.name,
        Credentials(account.api_key, make_signer(account.api_secret, account.private_key)),
    )
