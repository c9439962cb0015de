"""The PM API amount fields the exporter reads, and the metric each becomes: written once.

Read by the parser (binance/models.py), the collector, the dashboard generator
(grafana/generate.py) and the README check (tests/test_fields.py). Standard
library only, so that any of them can import it without pulling in the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

BALANCE_ENDPOINT = "GET /papi/v1/balance"
ACCOUNT_ENDPOINT = "GET /papi/v1/account"


@dataclass(frozen=True, slots=True)
class Field:
    """One amount of an API record and the gauge it is exposed as."""

    #: the field's name in the API's JSON
    api: str
    metric: str
    #: what the value is, for the metric's HELP (which adds the field and endpoint)
    help: str
    #: a short title, for dashboard panels and table columns
    title: str


#: GET /papi/v1/balance amount fields, one gauge per asset, in the order the API documents them
BALANCE: tuple[Field, ...] = (
    Field(
        "totalWalletBalance",
        "binance_pm_wallet_balance",
        "Wallet balance: cross margin free + locked + UM wallet + CM wallet",
        "Wallet balance",
    ),
    Field(
        "crossMarginAsset",
        "binance_pm_cross_margin_asset",
        "Cross margin asset: cross margin free + locked",
        "Cross margin asset",
    ),
    Field(
        "crossMarginBorrowed",
        "binance_pm_cross_margin_borrowed",
        "Cross margin borrowed principal",
        "Cross margin borrowed",
    ),
    Field(
        "crossMarginFree",
        "binance_pm_cross_margin_free",
        "Cross margin free asset",
        "Cross margin free",
    ),
    Field(
        "crossMarginInterest",
        "binance_pm_cross_margin_interest",
        "Cross margin interest",
        "Cross margin interest",
    ),
    Field(
        "crossMarginLocked",
        "binance_pm_cross_margin_locked",
        "Cross margin locked asset",
        "Cross margin locked",
    ),
    Field(
        "umWalletBalance",
        "binance_pm_um_wallet_balance",
        "USD-M futures wallet balance",
        "UM wallet balance",
    ),
    Field(
        "umUnrealizedPNL",
        "binance_pm_um_unrealized_pnl",
        "USD-M futures unrealized profit",
        "UM unrealized PnL",
    ),
    Field(
        "cmWalletBalance",
        "binance_pm_cm_wallet_balance",
        "COIN-M futures wallet balance",
        "CM wallet balance",
    ),
    Field(
        "cmUnrealizedPNL",
        "binance_pm_cm_unrealized_pnl",
        "COIN-M futures unrealized profit",
        "CM unrealized PnL",
    ),
    Field(
        "negativeBalance",
        "binance_pm_negative_balance",
        "Negative balance amount, as Binance reports it (0 when none; any other value, "
        "whatever its sign, is a negative balance)",
        "Negative balance",
    ),
)

#: GET /papi/v1/account amount fields, one gauge per account (the USD ones end in `_usd`)
ACCOUNT: tuple[Field, ...] = (
    Field(
        "uniMMR",
        "binance_pm_uni_mmr",
        "Unified maintenance margin ratio (lower is riskier; liquidation near 1.05)",
        "uniMMR",
    ),
    Field(
        "accountEquity",
        "binance_pm_account_equity_usd",
        "Account equity in USD",
        "Account equity",
    ),
    Field(
        "actualEquity",
        "binance_pm_actual_equity_usd",
        "Actual equity in USD (without collateral rate)",
        "Actual equity",
    ),
    Field(
        "accountInitialMargin",
        "binance_pm_initial_margin_usd",
        "Initial margin in USD",
        "Initial margin",
    ),
    Field(
        "accountMaintMargin",
        "binance_pm_maint_margin_usd",
        "Maintenance margin in USD",
        "Maintenance margin",
    ),
    Field(
        "totalAvailableBalance",
        "binance_pm_total_available_balance_usd",
        "Total available balance in USD",
        "Total available balance",
    ),
    Field(
        "totalMarginOpenLoss",
        "binance_pm_total_margin_open_loss_usd",
        "Total margin open loss in USD",
        "Total margin open loss",
    ),
    Field(
        "virtualMaxWithdrawAmount",
        "binance_pm_virtual_max_withdraw_amount_usd",
        "Virtual maximum withdrawal amount in USD",
        "Virtual max withdraw amount",
    ),
)

#: accountStatus values Binance documents, mildest first; binance_pm_account_status has a
#: series for each (and for any other status the account reports)
ACCOUNT_STATUSES = (
    "NORMAL",
    "MARGIN_CALL",
    "SUPPLY_MARGIN",
    "REDUCE_ONLY",
    "ACTIVE_LIQUIDATION",
    "FORCE_LIQUIDATION",
    "BANKRUPTED",
)

UM_ACCOUNT_ENDPOINT = "GET /papi/v1/um/account"
CM_ACCOUNT_ENDPOINT = "GET /papi/v1/cm/account"


def _futures_assets(book: str, name: str) -> tuple[Field, ...]:
    """The per-asset amounts of GET /papi/v1/{um,cm}/account (`assets[]`)."""
    prefix = f"binance_pm_{book}_asset"
    return (
        Field(
            "crossWalletBalance",
            f"{prefix}_cross_wallet_balance",
            f"{name} cross wallet balance",
            "Cross wallet",
        ),
        Field(
            "crossUnPnl",
            f"{prefix}_cross_unrealized_pnl",
            f"{name} cross unrealized profit",
            "Cross unrealized PnL",
        ),
        Field("maintMargin", f"{prefix}_maint_margin", f"{name} maintenance margin", "Maint."),
        Field("initialMargin", f"{prefix}_initial_margin", f"{name} initial margin", "Initial"),
        Field(
            "positionInitialMargin",
            f"{prefix}_position_initial_margin",
            f"{name} initial margin of the positions",
            "Position initial",
        ),
        Field(
            "openOrderInitialMargin",
            f"{prefix}_open_order_initial_margin",
            f"{name} initial margin of the open orders",
            "Open-order initial",
        ),
    )


def _futures_positions(book: str, name: str) -> tuple[Field, ...]:
    """The per-position amounts of GET /papi/v1/{um,cm}/account (`positions[]`)."""
    prefix = f"binance_pm_{book}_position"
    unit = "contracts" if book == "cm" else "base asset"
    return (
        Field(
            "positionAmt",
            f"{prefix}_amount",
            f"{name} position amount in {unit} (negative: short)",
            "Amount",
        ),
        Field("entryPrice", f"{prefix}_entry_price", f"{name} position entry price", "Entry"),
        Field(
            "unrealizedProfit",
            f"{prefix}_unrealized_profit",
            f"{name} position unrealized profit",
            "Unrealized profit",
        ),
        Field(
            "maintMargin", f"{prefix}_maint_margin", f"{name} position maintenance margin", "Maint."
        ),
        Field(
            "initialMargin",
            f"{prefix}_initial_margin",
            f"{name} position initial margin",
            "Initial",
        ),
        Field("leverage", f"{prefix}_leverage", f"{name} position leverage", "Leverage"),
    )


#: GET /papi/v1/um/account: one gauge per asset (account, asset) and per position
#: (account, position_side, symbol)
UM_ASSETS = _futures_assets("um", "USD-M futures")
UM_POSITIONS = (
    *_futures_positions("um", "USD-M futures"),
    Field(
        "maxNotional",
        "binance_pm_um_position_max_notional",
        "USD-M futures position's largest notional at its current leverage",
        "Max notional",
    ),
)
#: GET /papi/v1/cm/account: the same per asset and position
CM_ASSETS = _futures_assets("cm", "COIN-M futures")
CM_POSITIONS = _futures_positions("cm", "COIN-M futures")
