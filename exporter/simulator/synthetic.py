"""Plausible made-up Portfolio Margin balances and account risk.

Amounts are `Decimal`s with 8 decimals, so the identities the API documents hold
exactly in what is served:
    crossMarginAsset   = crossMarginFree + crossMarginLocked
    totalWalletBalance = crossMarginFree + crossMarginLocked + umWalletBalance + cmWalletBalance

Every asset has one USD price, the same in every account, and `spot_ticker()` serves
prices that lead back to exactly it by the exporter's valuation rule: the well-known
assets through their USDT pair, the generated ones through USDT, USDC or BTC in turn
(a BTC-routed price is a whole number of satoshis times the BTC price). So the sum over
an account's assets of units x price is its `actualEquity`, to float rounding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

EIGHT_PLACES = Decimal("0.00000001")
ZERO = Decimal(0)

# Well-known assets first, with rough USD prices; more assets get generated names.
KNOWN_ASSETS: tuple[tuple[str, str], ...] = (
    ("USDT", "1"),
    ("BTC", "65000"),
    ("ETH", "3200"),
    ("BNB", "580"),
    ("FDUSD", "1"),
    ("SOL", "150"),
    ("XRP", "0.55"),
    ("DOGE", "0.15"),
    ("USDC", "1"),
    ("ADA", "0.45"),
    ("LINK", "14"),
    ("TRX", "0.12"),
    ("AVAX", "28"),
    ("DOT", "6"),
    ("LTC", "80"),
    ("TON", "5.5"),
)
STABLECOINS = frozenset({"USDT", "FDUSD", "USDC"})
#: quote of the spot pair that prices a generated asset ASSET<n>: by n modulo 3
GENERATED_QUOTES = ("USDT", "USDC", "BTC")
COIN_MARGINED = frozenset({"BTC", "ETH", "BNB", "SOL", "XRP", "DOGE", "ADA", "LINK", "DOT", "LTC"})


def amount(value: Decimal | float) -> Decimal:
    """A value rounded to Binance's 8 decimals."""
    return Decimal(str(value)).quantize(EIGHT_PLACES)


def format_amount(value: Decimal) -> str:
    """Binance's decimal-string style: "123.45000000"."""
    return f"{value.quantize(EIGHT_PLACES):f}"


def asset_names(count: int) -> list[str]:
    known = [name for name, _ in KNOWN_ASSETS[:count]]
    return known + [f"ASSET{i}" for i in range(len(known), count)]


@dataclass
class SyntheticAsset:
    """One asset of one account; `record()` renders it as /papi/v1/balance does."""

    asset: str
    price_usd: Decimal
    cross_free: Decimal
    cross_locked: Decimal
    cross_borrowed: Decimal
    cross_interest: Decimal
    um_wallet: Decimal
    um_pnl: Decimal
    cm_wallet: Decimal
    cm_pnl: Decimal | None  # None is served as "" (no coin-margined book for this asset)
    negative: Decimal
    update_ms: int

    @property
    def wallet(self) -> Decimal:
        return self.cross_free + self.cross_locked + self.um_wallet + self.cm_wallet

    def record(self) -> dict[str, Any]:
        return {
            "asset": self.asset,
            "totalWalletBalance": format_amount(self.wallet),
            "crossMarginAsset": format_amount(self.cross_free + self.cross_locked),
            "crossMarginBorrowed": format_amount(self.cross_borrowed),
            "crossMarginFree": format_amount(self.cross_free),
            "crossMarginInterest": format_amount(self.cross_interest),
            "crossMarginLocked": format_amount(self.cross_locked),
            "umWalletBalance": format_amount(self.um_wallet),
            "umUnrealizedPNL": format_amount(self.um_pnl),
            "cmWalletBalance": format_amount(self.cm_wallet),
            "cmUnrealizedPNL": "" if self.cm_pnl is None else format_amount(self.cm_pnl),
            "updateTime": self.update_ms,
            "negativeBalance": "0" if self.negative == ZERO else format_amount(self.negative),
        }

    def usd_equity(self) -> Decimal:
        """What the asset adds to the account's equity, in USD."""
        pnl = self.um_pnl + (self.cm_pnl or ZERO)
        units = self.wallet + pnl - self.cross_borrowed - self.cross_interest - self.negative
        return units * self.price_usd

    def drift(self, rng: random.Random, now_ms: int, move_chance: float) -> None:
        """A small random move, as markets nudge a real account: unrealized PnL moves
        every time (Binance pushes no event for that); with `move_chance`, so do the free
        balance and the interest (a trade, a fee, interest accruing: events)."""
        scale = float(self.wallet) * 0.001 + 0.01
        self.um_pnl = amount(float(self.um_pnl) * 0.98 + rng.gauss(0.0, scale))
        if self.cm_pnl is not None:
            self.cm_pnl = amount(float(self.cm_pnl) * 0.98 + rng.gauss(0.0, scale))
        if rng.random() < move_chance:
            self.cross_free = max(ZERO, amount(float(self.cross_free) * rng.gauss(1.0, 0.002)))
            if self.cross_borrowed > ZERO:
                self.cross_interest += amount(float(self.cross_borrowed) * 0.000001)
        self.update_ms = now_ms


def make_asset(name: str, price_usd: Decimal, rng: random.Random, now_ms: int) -> SyntheticAsset:
    units = rng.uniform(200.0, 50_000.0) / float(price_usd)
    free = amount(units * rng.uniform(0.3, 1.0))
    locked = amount(units * rng.choice((0.0, 0.0, 0.05)))
    borrowed = amount(units * rng.choice((0.0, 0.0, 0.1)))
    interest = amount(float(borrowed) * rng.uniform(0.0005, 0.002))
    stable = name in STABLECOINS
    um_wallet = amount(units * rng.uniform(0.1, 2.0)) if stable else ZERO
    um_pnl = amount(rng.gauss(0.0, units * 0.01)) if stable else ZERO
    coin_margined = name in COIN_MARGINED
    cm_wallet = amount(units * rng.uniform(0.0, 0.5)) if coin_margined else ZERO
    cm_pnl = amount(rng.gauss(0.0, units * 0.005)) if coin_margined else None
    return SyntheticAsset(
        asset=name,
        price_usd=price_usd,
        cross_free=free,
        cross_locked=locked,
        cross_borrowed=borrowed,
        cross_interest=interest,
        um_wallet=um_wallet,
        um_pnl=um_pnl,
        cm_wallet=cm_wallet,
        cm_pnl=cm_pnl,
        negative=ZERO,
        update_ms=now_ms - rng.randrange(0, 3_600_000),
    )


def price_usd(name: str) -> Decimal:
    """The asset's one USD price: known, or made up from its name (the same everywhere)."""
    known = dict(KNOWN_ASSETS)
    if name in known:
        return Decimal(known[name])
    made_up = amount(random.Random(f"price:{name}").uniform(0.01, 50.0))  # noqa: S311
    if _quote_of(name) == "BTC":  # a whole number of satoshis, so the BTC route is exact
        return amount(made_up / Decimal(known["BTC"])) * Decimal(known["BTC"])
    return made_up


def _quote_of(name: str) -> str:
    index = name.removeprefix("ASSET")
    return GENERATED_QUOTES[int(index) % 3] if index.isdigit() else "USDT"


def spot_ticker(n_assets: int = 64) -> dict[str, str]:
    """symbol -> price, as GET /api/v3/ticker/price serves them, for the first `n_assets`
    asset names (stablecoins have no pair of their own: they count as 1 USD)."""
    btc = Decimal(dict(KNOWN_ASSETS)["BTC"])
    ticker = {"USDCUSDT": "1.00000000", "FDUSDUSDT": "1.00000000", "ETHBTC": "0.04923077"}
    for name in asset_names(n_assets):
        if name in STABLECOINS:
            continue
        quote = _quote_of(name)
        price = price_usd(name) / btc if quote == "BTC" else price_usd(name)
        ticker[f"{name}{quote}"] = format_amount(price)
    return ticker


def make_portfolio(rng: random.Random, n_assets: int, now_ms: int) -> list[SyntheticAsset]:
    return [make_asset(name, price_usd(name), rng, now_ms) for name in asset_names(n_assets)]


@dataclass
class SyntheticRisk:
    """Per-account margin parameters that stay put while balances drift."""

    initial_margin_ratio: Decimal  # initial margin as a fraction of equity
    status: str = "NORMAL"


def make_risk(rng: random.Random) -> SyntheticRisk:
    return SyntheticRisk(initial_margin_ratio=amount(rng.uniform(0.02, 0.3)))


def account_info(
    portfolio: list[SyntheticAsset], risk: SyntheticRisk, now_ms: int
) -> dict[str, Any]:
    """GET /papi/v1/account for a portfolio: equity in USD, margins, uniMMR, status."""
    actual_equity = sum((a.usd_equity() for a in portfolio), ZERO)
    haircut = sum(
        (a.usd_equity() * Decimal("0.05") for a in portfolio if a.asset not in STABLECOINS), ZERO
    )
    equity = actual_equity - haircut
    initial = max(ZERO, equity * risk.initial_margin_ratio)
    maint = initial * Decimal("0.4")
    open_loss = -sum((min(ZERO, a.um_pnl) * a.price_usd for a in portfolio), ZERO)
    available = equity - initial
    uni_mmr = equity / maint if maint > ZERO else Decimal(999)
    return {
        "uniMMR": format_amount(uni_mmr),
        "accountEquity": format_amount(equity),
        "actualEquity": format_amount(actual_equity),
        "accountInitialMargin": format_amount(initial),
        "accountMaintMargin": format_amount(maint),
        "accountStatus": risk.status,
        "virtualMaxWithdrawAmount": format_amount(max(ZERO, available * Decimal("0.9"))),
        "totalAvailableBalance": format_amount(available),
        "totalMarginOpenLoss": format_amount(open_loss),
        "updateTime": now_ms,
    }


#: the futures books and the symbols each trades (a USD-M symbol is quoted in USDT, a
#: COIN-M one is a perpetual of the base coin, counted in contracts)
FUTURES_SYMBOLS = {
    "um": ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT"),
    "cm": ("BTCUSD_PERP", "ETHUSD_PERP", "BNBUSD_PERP", "SOLUSD_PERP", "XRPUSD_PERP"),
}
#: USD value of one COIN-M contract (Binance: 100 for BTC, 10 for the others)
_CM_CONTRACT_USD = {"BTCUSD_PERP": Decimal(100)}
_MAINT_RATE = Decimal("0.004")


def _base_of(symbol: str) -> str:
    return symbol.removesuffix("USD_PERP").removesuffix("USDT")


@dataclass
class SyntheticPosition:
    """One position of one futures book; `record()` renders it as the book's account
    endpoint does. Its mark price moves with `drift`, and so its PnL and margins."""

    book: str
    symbol: str
    amount: Decimal  # base units (UM) or contracts (CM); negative: short; 0: closed
    entry: Decimal
    mark: Decimal
    leverage: int
    update_ms: int

    def notional_usd(self) -> Decimal:
        if self.book == "cm":
            return abs(self.amount) * _CM_CONTRACT_USD.get(self.symbol, Decimal(10))
        return abs(self.amount) * self.mark

    def unrealized(self) -> Decimal:
        if self.book == "cm":  # in the base coin: contracts x value x (1/entry - 1/mark)
            if self.amount == ZERO:
                return ZERO
            value = _CM_CONTRACT_USD.get(self.symbol, Decimal(10))
            return amount(self.amount * value * (1 / self.entry - 1 / self.mark))
        return amount(self.amount * (self.mark - self.entry))

    def margins(self) -> tuple[Decimal, Decimal]:
        """(initial, maintenance), in the book's margin asset."""
        notional = self.notional_usd()
        if self.book == "cm":
            notional = notional / self.mark
        return amount(notional / self.leverage), amount(notional * _MAINT_RATE)

    def record(self) -> dict[str, Any]:
        initial, maint = self.margins()
        record = {
            "symbol": self.symbol,
            "initialMargin": format_amount(initial),
            "maintMargin": format_amount(maint),
            "unrealizedProfit": format_amount(self.unrealized()),
            "positionInitialMargin": format_amount(initial),
            "openOrderInitialMargin": "0",
            "leverage": str(self.leverage),
            "entryPrice": format_amount(self.entry),
            "positionSide": "BOTH",
            "positionAmt": format_amount(self.amount),
            "updateTime": self.update_ms,
        }
        if self.book == "um":
            record["maxNotional"] = "250000"
            record["bidNotional"] = record["askNotional"] = "0"
        else:
            record["maxQty"] = "1000"
        return record

    def drift(self, rng: random.Random, now_ms: int) -> None:
        """The mark moves a little; the amount stays (the demo's positions are held)."""
        self.mark = max(Decimal("0.0001"), amount(float(self.mark) * rng.gauss(1.0, 0.001)))
        self.update_ms = now_ms


def make_positions(
    rng: random.Random, book: str, count: int, now_ms: int
) -> list[SyntheticPosition]:
    """`count` open positions of `book` (at most one per symbol), then one closed one, as
    Binance lists symbols with `positionAmt` 0 too."""
    symbols = FUTURES_SYMBOLS[book]
    positions = []
    for index in range(min(count + 1, len(symbols))):
        symbol = symbols[index]
        price = price_usd(_base_of(symbol))
        size = rng.uniform(500.0, 20_000.0)
        units = size / float(price) if book == "um" else size / 10
        side = rng.choice((1, -1))
        closed = index == count
        positions.append(
            SyntheticPosition(
                book=book,
                symbol=symbol,
                amount=ZERO
                if closed
                else amount(side * units if book == "um" else side * round(units)),
                entry=amount(float(price) * rng.uniform(0.97, 1.03)),
                mark=price,
                leverage=rng.choice((5, 10, 20)),
                update_ms=now_ms - rng.randrange(0, 3_600_000),
            )
        )
    return positions


def futures_account(
    book: str,
    portfolio: list[SyntheticAsset],
    positions: list[SyntheticPosition],
    now_ms: int,
) -> dict[str, Any]:
    """GET /papi/v1/um/account or /papi/v1/cm/account for a portfolio and its positions:
    a book's assets are the portfolio's (UM: the stablecoins, CM: the coin-margined
    coins), their margins the sums of their positions'."""
    assets = []
    for asset in portfolio:
        if book == "um":
            held, wallet, pnl = asset.asset in STABLECOINS, asset.um_wallet, asset.um_pnl
            mine = [p for p in positions if asset.asset == "USDT"]
        else:
            held, wallet, pnl = asset.cm_pnl is not None, asset.cm_wallet, asset.cm_pnl or ZERO
            mine = [p for p in positions if _base_of(p.symbol) == asset.asset]
        if not held:
            continue
        initial = sum((p.margins()[0] for p in mine), ZERO)
        maint = sum((p.margins()[1] for p in mine), ZERO)
        assets.append(
            {
                "asset": asset.asset,
                "crossWalletBalance": format_amount(wallet),
                "crossUnPnl": format_amount(pnl),
                "maintMargin": format_amount(maint),
                "initialMargin": format_amount(initial),
                "positionInitialMargin": format_amount(initial),
                "openOrderInitialMargin": "0",
                "updateTime": now_ms,
            }
        )
    return {"assets": assets, "positions": [p.record() for p in positions]}
