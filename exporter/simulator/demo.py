"""Demo mode, the simulator's side: a running simulator with fresh keys and balances
and futures positions that move.

`start_demo()` returns the started simulator and config data for
`exporter.config.parse_config`, so `binance-pm-exporter --demo` needs no file and
no real keys. Balances drift every second, the desk trades lightly (`DEMO_TRADE_RATE`
fills a second, each pushing its events, as a desk's bots do all day) and, now and then,
one account shows a negative balance for a while, so dashboards and alerts have
something to show, through the same traffic a desk's streams carry; the futures
positions' marks drift too. The exporter's side of the demo (the USD log, the episode
timing) is exporter/demo.py: the simulator knows nothing of the exporter.
"""

from __future__ import annotations

import random
import secrets
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from exporter.simulator import synthetic
from exporter.simulator.auth import KeyType, SimAccount
from exporter.simulator.server import Simulator
from exporter.simulator.state import FUTURES_BOOKS, POSITIONS_PER_BOOK
from exporter.simulator.trading import start_trading

DEMO_KEY_TYPES: tuple[KeyType, ...] = ("hmac", "ed25519", "rsa")
log = structlog.get_logger("exporter.demo")
NEGATIVE_EVERY_SECONDS = (30.0, 90.0)  # gap between two negative-balance episodes
NEGATIVE_FOR_SECONDS = (10.0, 30.0)  # how long one lasts
FIRST_NEGATIVE_SECONDS = (5.0, 15.0)  # when the first one starts, after the drift does
#: the chance per asset and tick that its balance moves (an event on the stream): about
#: one event every 40 s per 8-asset account. A balance moving every second on every
#: account would keep each account's triggered refreshes at their limit (one per
#: `stream.min_refresh_interval_seconds`), and a negative episode would wait for it.
BALANCE_MOVE_CHANCE = 0.003
#: the demo desk's fills per second, across its accounts (`--trade-rate` of the simulator)
DEMO_TRADE_RATE = 1.0


class EpisodeListener(Protocol):
    """Hears of each negative-balance episode as the drift starts serving it (the
    exporter's demo wiring, exporter/demo.py, times how soon /metrics shows it)."""

    def started(self, account: str, asset: str, negative: str) -> None: ...


@dataclass(frozen=True)
class GeneratedAccount:
    """A made-up account: what the simulator checks, and the exporter's config entry."""

    sim_account: SimAccount
    config: dict[str, str]  # name, api_key, and api_secret or private_key (PEM): secrets inline

    def __repr__(self) -> str:
        return f"GeneratedAccount({self.sim_account.name!r}, {self.sim_account.key_type})"


def generate_account(name: str, key_type: KeyType) -> GeneratedAccount:
    """Fresh random credentials of `key_type`; RSA keys are 2048-bit."""
    api_key = secrets.token_hex(32)
    if key_type == "hmac":
        secret = secrets.token_hex(32)
        account = SimAccount.hmac(name, api_key, secret)
        return GeneratedAccount(account, {"name": name, "api_key": api_key, "api_secret": secret})
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if key_type == "rsa":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private_key = ed25519.Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    make = SimAccount.rsa if key_type == "rsa" else SimAccount.ed25519
    return GeneratedAccount(
        make(name, api_key, public_pem),
        {"name": name, "api_key": api_key, "private_key": private_pem},
    )


class Drift:
    """Moves every account's balances a little per `tick()`; one at a time goes negative.

    Drift owns the accounts' data while it runs: each tick serves its own
    portfolios again, replacing whatever was set through the simulator meanwhile.
    """

    def __init__(
        self,
        sim: Simulator,
        *,
        assets_per_account: int,
        rng: random.Random,
        move_chance: float = BALANCE_MOVE_CHANCE,
        episodes: EpisodeListener | None = None,
        first_episode: tuple[float, float] = FIRST_NEGATIVE_SECONDS,
    ) -> None:
        self._sim = sim
        self._rng = rng
        self._move_chance = move_chance
        self._episodes = episodes
        now_ms = sim.state.now_ms()
        self._portfolios = {
            name: synthetic.make_portfolio(rng, assets_per_account, now_ms)
            for name in sim.account_names
        }
        self._risks = {name: synthetic.make_risk(rng) for name in sim.account_names}
        self._positions = {
            name: {
                book: synthetic.make_positions(rng, book, POSITIONS_PER_BOOK, now_ms)
                for book in FUTURES_BOOKS
            }
            for name in sim.account_names
        }
        self._negative: tuple[synthetic.SyntheticAsset, int] | None = None  # asset, until ms
        self._announce: tuple[str, synthetic.SyntheticAsset] | None = None  # started this tick
        self._lock = threading.Lock()  # the ticks and the fills come from two threads
        self._next_negative_ms = now_ms + int(rng.uniform(*first_episode) * 1000)
        self._publish(now_ms)

    def tick(self) -> None:
        with self._lock:
            now_ms = self._sim.state.now_ms()
            self._negative_episode(now_ms)
            for portfolio in self._portfolios.values():
                for asset in portfolio:
                    asset.drift(self._rng, now_ms, self._move_chance)
            for books in self._positions.values():
                for positions in books.values():
                    for position in positions:
                        position.drift(self._rng, now_ms)
            self._publish(now_ms)

    def assets(self, account: str) -> list[str]:
        """The assets of `account`'s portfolio, for `trading.start_trading`."""
        return [asset.asset for asset in self._portfolios.get(account, [])]

    def fill(self, account: str, asset: str, wallet: Decimal, free: Decimal) -> bool:
        """A fill (see `trading`) made in the simulator and in the drifted portfolio alike,
        so the next tick keeps it; never on the account of the negative episode."""
        with self._lock:
            portfolio = self._portfolios.get(account, [])
            held = next((a for a in portfolio if a.asset == asset), None)
            if held is None or any(a.negative for a in portfolio):
                return False
            if not self._sim.state.book.trade(account, asset, wallet, free):
                return False
            held.um_wallet += wallet
            held.cross_free += free
            return True

    def _negative_episode(self, now_ms: int) -> None:
        if self._negative is not None:
            asset, until_ms = self._negative
            if now_ms >= until_ms:
                asset.negative = synthetic.ZERO
                asset.cross_free = synthetic.amount(self._rng.uniform(100.0, 1000.0))
                self._negative = None
                gap = self._rng.uniform(*NEGATIVE_EVERY_SECONDS)
                self._next_negative_ms = now_ms + int(gap * 1000)
        elif now_ms >= self._next_negative_ms and self._portfolios:
            name = self._rng.choice(list(self._portfolios))
            portfolio = self._portfolios[name]
            if portfolio:
                asset = portfolio[0]
                asset.cross_free = synthetic.ZERO
                asset.negative = synthetic.amount(self._rng.uniform(5.0, 500.0))
                duration = self._rng.uniform(*NEGATIVE_FOR_SECONDS)
                self._negative = (asset, now_ms + int(duration * 1000))
                self._announce = (name, asset)

    def _publish(self, now_ms: int) -> None:
        for name, portfolio in self._portfolios.items():
            self._sim.set_balances(name, [asset.record() for asset in portfolio])
            info = synthetic.account_info(portfolio, self._risks[name], now_ms)
            self._sim.set_account_info(name, info)
            for book, positions in self._positions[name].items():
                payload = synthetic.futures_account(book, portfolio, positions, now_ms)
                self._sim.set_futures_account(name, book, payload)
        if self._announce is not None and self._episodes is not None:
            name, asset = self._announce
            self._episodes.started(name, asset.asset, synthetic.format_amount(asset.negative))
        self._announce = None


def start_drift(
    sim: Simulator,
    *,
    assets_per_account: int,
    tick_seconds: float = 1.0,
    seed: int | None = None,
    move_chance: float = BALANCE_MOVE_CHANCE,
    episodes: EpisodeListener | None = None,
    first_episode: tuple[float, float] = FIRST_NEGATIVE_SECONDS,
) -> Drift:
    """Drift the started simulator's balances every `tick_seconds` until `sim.stop()`; the
    first negative episode starts `first_episode` (a range, seconds) in."""
    rng = random.Random(seed)  # noqa: S311 - made-up balances, not cryptography
    drift = Drift(
        sim,
        assets_per_account=assets_per_account,
        rng=rng,
        move_chance=move_chance,
        episodes=episodes,
        first_episode=first_episode,
    )
    sim.every(tick_seconds, drift.tick, name="sim-drift")
    return drift


def account_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}{index:0{max(2, len(str(count - 1)))}d}"


def start_demo(
    n_accounts: int = 3,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    assets_per_account: int = 8,
    key_types: tuple[KeyType, ...] = DEMO_KEY_TYPES,
    tick_seconds: float = 1.0,
    episodes: EpisodeListener | None = None,
    trade_rate: float = DEMO_TRADE_RATE,
    first_episode: tuple[float, float] = FIRST_NEGATIVE_SECONDS,
) -> tuple[Simulator, dict[str, Any]]:
    """A started, drifting, trading (`trade_rate` fills a second) simulator and the
    exporter's config data pointing at it.

    Accounts are desk-a, desk-b, ... with HMAC, Ed25519 and RSA keys in turn; `episodes`
    hears of each negative-balance episode as it starts.
    The caller stops the simulator with `sim.stop()`.
    """
    names = [
        f"desk-{chr(ord('a') + i)}" if n_accounts <= 26 else account_name("desk-", i, n_accounts)
        for i in range(n_accounts)
    ]
    generated = [
        generate_account(name, key_types[i % len(key_types)]) for i, name in enumerate(names)
    ]
    sim = Simulator(
        [g.sim_account for g in generated], host, port, assets_per_account=assets_per_account
    )
    sim.start()
    try:
        drift = start_drift(
            sim,
            assets_per_account=assets_per_account,
            tick_seconds=tick_seconds,
            episodes=episodes,
            first_episode=first_episode,
        )
        if trade_rate > 0:
            start_trading(sim, trade_rate, fill=drift.fill, assets=drift.assets)
    except BaseException:
        sim.stop()
        raise
    data = exporter_config(
        sim.url,
        generated,
        budget={"ip_weight_limit_per_minute": 6000, "share": 0.25, "min_interval_seconds": 10},
        stream_url=sim.stream_url,
    )
    # the futures books too, whose positions drift: the Futures margin row has data
    data["collect"] = {"um_account": True, "cm_account": True}
    return sim, data


def exporter_config(
    base_url: str,
    accounts: list[GeneratedAccount],
    *,
    budget: dict[str, Any] | None = None,
    stream_url: str | None = None,
) -> dict[str, Any]:
    """Config data (as config.yaml would hold it) for an exporter polling the simulator;
    with the simulator's `stream_url`, listening to its user data streams too (without,
    the stream is off: its default URL is Binance's)."""
    # The simulator serves the spot price ticker too.
    data: dict[str, Any] = {"binance": {"base_url": base_url}, "prices": {"base_url": base_url}}
    if stream_url is None:
        data["stream"] = {"enabled": False}
    else:
        data["binance"]["stream_url"] = stream_url
    if budget is not None:
        data["budget"] = dict(budget)
    data["accounts"] = [dict(account.config) for account in accounts]
    return data


__all__ = [
    "Drift",
    "EpisodeListener",
    "GeneratedAccount",
    "exporter_config",
    "generate_account",
    "start_demo",
    "start_drift",
]
