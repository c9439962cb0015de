"""Generate the Grafana dashboards of binance-pm-exporter with grafana-foundation-sdk.

    python grafana/generate.py           # (re)write grafana/dashboards/*.json
    python grafana/generate.py --check   # exit 1 when a committed file differs

The JSON files are committed; tests/test_dashboards.py fails when they differ from
a fresh generation. Edit this file, never the JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import statetimeline as statetimeline_b
from grafana_foundation_sdk.builders import table as table_b
from grafana_foundation_sdk.builders import timeseries as timeseries_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dash
from grafana_foundation_sdk.models import prometheus as prom

from exporter import fields

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"

# Keep in step with BinancePMUniMMRLow / BinancePMUniMMRCritical in prometheus/alerts.yml.
UNI_MMR_WARNING = 1.5
UNI_MMR_CRITICAL = 1.2

DATASOURCE = dash.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["binance-pm"]
TARGET = 'job=~"$job", instance=~"$instance"'
#: the accounts of the chosen desks (accounts[].labels.desk, on binance_pm_account_info)
DESK = f'{TARGET}, desk=~"$desk"'

# accountStatus as coded by the recording rule account:binance_pm_account_status:code:
# the known statuses in their order, then UNKNOWN.
STATUS_COLORS = {
    "NORMAL": "green",
    "MARGIN_CALL": "orange",
    "SUPPLY_MARGIN": "orange",
    "REDUCE_ONLY": "red",
    "ACTIVE_LIQUIDATION": "red",
    "FORCE_LIQUIDATION": "dark-red",
    "BANKRUPTED": "dark-red",
}
STATUS_CODES = [(s, STATUS_COLORS[s]) for s in fields.ACCOUNT_STATUSES] + [("UNKNOWN", "purple")]

# Per-account USD fields of GET /papi/v1/account.
ACCOUNT_USD_FIELDS = [f for f in fields.ACCOUNT if f.metric.endswith("_usd")]

PanelBuilder = Callable[[], Any]


# --- small builders -------------------------------------------------------------


def query(
    expr: str, legend: str = "__auto", ref: str = "A", *, instant: bool = False
) -> prom_b.Dataquery:
    target = prom_b.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    if instant:
        return target.instant().format(prom.PromQueryFormat.TABLE)
    return target.range()


def thresholds(*steps: tuple[float | None, str]) -> dash_b.ThresholdsConfig:
    return (
        dash_b.ThresholdsConfig()
        .mode(dash.ThresholdsMode.ABSOLUTE)
        .steps([dash.Threshold(value=value, color=color) for value, color in steps])
    )


def uni_mmr_thresholds() -> dash_b.ThresholdsConfig:
    return thresholds((None, "red"), (UNI_MMR_CRITICAL, "orange"), (UNI_MMR_WARNING, "green"))


def status_mappings() -> list[dash.ValueMapping]:
    return [
        dash.ValueMap(
            options={
                str(code): dash.ValueMappingResult(text=name, color=color, index=code)
                for code, (name, color) in enumerate(STATUS_CODES)
            }
        )
    ]


def up_mappings() -> list[dash.ValueMapping]:
    return [
        dash.ValueMap(
            options={
                "0": dash.ValueMappingResult(text="failing", color="red", index=0),
                "1": dash.ValueMappingResult(text="up", color="green", index=1),
            }
        )
    ]


def legend_table() -> common_b.VizLegendOptions:
    return (
        common_b.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull", "min", "max"])
    )


def timeseries(
    title: str, description: str, unit: str, targets: Sequence[Any], *, width: int = 12
) -> timeseries_b.Panel:
    return (
        timeseries_b.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .legend(legend_table())
        .height(8)
        .span(width)
    )


def stat(
    title: str, description: str, unit: str, targets: Sequence[Any], *, width: int = 6
) -> stat_b.Panel:
    return (
        stat_b.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .graph_mode(common.BigValueGraphMode.NONE)
        .height(5)
        .span(width)
    )


def variables(*, account: str | None) -> list[Any]:
    """datasource, job, instance and desk; account as 'multi', 'single' or None (the accounts
    of the chosen desks); asset with single."""
    result: list[Any] = [
        dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        label_variable("job", "Job", "binance_pm_exporter_build_info", "job"),
        label_variable(
            "instance", "Instance", 'binance_pm_exporter_build_info{job=~"$job"}', "instance"
        ),
        # ".*" for All: accounts without a desk label too
        label_variable("desk", "Desk", f"binance_pm_account_info{{{TARGET}}}", "desk"),
    ]
    if account is not None:
        # All is the accounts listed (those of the chosen desks), not ".*"
        acc = label_variable(
            "account", "Account", f"binance_pm_account_info{{{DESK}}}", "account", all_value=None
        )
        if account == "single":
            acc = acc.multi(False).include_all(False)
        result.append(acc)
    if account == "single":
        result.append(
            label_variable(
                "asset",
                "Asset",
                f'binance_pm_wallet_balance{{{TARGET}, account="$account"}}',
                "asset",
            )
        )
    return result


def label_variable(
    name: str, label: str, metric: str, label_name: str, *, all_value: str | None = ".*"
) -> Any:
    variable = (
        dash_b.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(f"label_values({metric}, {label_name})")
        .refresh(dash.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dash.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .current(dash.VariableOption(selected=True, text="All", value="$__all"))
    )
    return variable if all_value is None else variable.all_value(all_value)


def of_desk(series: str) -> str:
    """`series` (per account) limited to the accounts of the chosen desks."""
    return f"({series} and on (job, instance, account) binance_pm_account_info{{{DESK}}})"


def new_dashboard(uid: str, title: str, description: str) -> dash_b.Dashboard:
    return (
        dash_b.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dash.DashboardCursorSync.CROSSHAIR)
        .link(
            dash_b.DashboardLink("Binance PM")
            .type(dash.DashboardLinkType.DASHBOARDS)
            .tags(TAGS)
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )


def finish(builder: dash_b.Dashboard) -> dict[str, Any]:
    """Build, number the panels in order, and return plain JSON data."""
    data: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    next_id = 1
    for panel in data["panels"]:
        panel["id"] = next_id
        next_id += 1
        for inner in panel.get("panels", []):
            inner["id"] = next_id
            next_id += 1
    return data


# --- the dashboards -------------------------------------------------------------


_SELECTOR = re.compile(
    r"((?:job|asset|account):)?(binance_pm_\w+?)(:\w+)?\{" + re.escape(TARGET) + r"\}"
)
#: metrics without an account label, which no desk filters: the prices
_NOT_PER_ACCOUNT = ("binance_pm_asset_price_usd", "binance_pm_price_update_timestamp_seconds")


def desk_filtered(expr: str) -> str:
    """`expr` with each series of accounts limited to the chosen desks. A total over
    accounts (a job: or asset: recording rule) is computed from its per-account series
    instead, so that it is the desks' total."""

    def limited(match: re.Match[str]) -> str:
        level, metric, _ = match.groups()
        if metric in _NOT_PER_ACCOUNT:
            return match.group(0)
        if level in ("job:", "asset:"):  # sum without (account) (metric): per account again
            return f"sum without (account) ({of_desk(f'{metric}{{{TARGET}}}')})"
        return of_desk(match.group(0))

    return _SELECTOR.sub(limited, expr)


def limit_to_desks(data: dict[str, Any]) -> dict[str, Any]:
    """A dashboard whose every query keeps to the chosen desks' accounts."""
    for panel in data["panels"]:
        for inner in (panel, *panel.get("panels", [])):
            for target in inner.get("targets", []):
                target["expr"] = desk_filtered(target["expr"])
    return data


def overview() -> dict[str, Any]:
    sel = TARGET
    board = new_dashboard(
        "binance-pm-overview",
        "Binance PM / Overview",
        "All Binance Portfolio Margin accounts of binance-pm-exporter, or those of the chosen "
        "desks: equity, uniMMR, status, negative balances, borrowing and unrealized PnL.",
    ).variables(variables(account=None))

    board.with_row(dash_b.Row("Accounts"))
    board.with_panel(
        stat(
            "Total equity",
            "Sum of accountEquity over all accounts, in USD (GET /papi/v1/account).",
            "currencyUSD",
            [query(f"sum(job:binance_pm_account_equity_usd:sum{{{sel}}})", "equity")],
        ).color_mode(common.BigValueColorMode.NONE)
    )
    board.with_panel(
        stat(
            "Lowest uniMMR",
            "The lowest unified maintenance margin ratio of any account. Orange below "
            f"{UNI_MMR_WARNING}, red below {UNI_MMR_CRITICAL}; Binance liquidates at 1.05.",
            "none",
            [query(f"min(binance_pm_uni_mmr{{{sel}}})", "lowest uniMMR")],
        )
        .decimals(3)
        .thresholds(uni_mmr_thresholds())
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )
    board.with_panel(
        stat(
            "Assets with a negative balance",
            "Number of (account, asset) pairs whose negativeBalance is not 0. "
            "Any non-zero value is a debt to Binance and fires BinancePMNegativeBalance.",
            "none",
            [
                query(
                    f"sum(account:binance_pm_negative_balance_assets:count{{{sel}}})",
                    "negative balances",
                )
            ],
        )
        .thresholds(thresholds((None, "green"), (1, "red")))
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )
    board.with_panel(
        stat(
            "Accounts not NORMAL",
            "Number of accounts whose accountStatus is not NORMAL.",
            "none",
            [
                query(
                    f"count(account:binance_pm_account_status:code{{{sel}}} > 0) or vector(0)",
                    "not NORMAL",
                )
            ],
        )
        .thresholds(thresholds((None, "green"), (1, "red")))
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )
    board.with_panel(
        stat(
            "uniMMR by account",
            "Unified maintenance margin ratio (uniMMR) per account: lower is riskier. "
            f"Orange below {UNI_MMR_WARNING} (warning alert), red below {UNI_MMR_CRITICAL} "
            "(critical alert); Binance liquidates at 1.05. Click for the account's detail.",
            "none",
            [query(f"binance_pm_uni_mmr{{{sel}}}", "{{account}}")],
            width=12,
        )
        .decimals(3)
        .thresholds(uni_mmr_thresholds())
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .data_links([account_link()])
    )
    board.with_panel(
        stat(
            "Status by account",
            "accountStatus per account (GET /papi/v1/account): NORMAL in green, "
            "MARGIN_CALL and SUPPLY_MARGIN in orange, REDUCE_ONLY and liquidation in red.",
            "none",
            [query(f"account:binance_pm_account_status:code{{{sel}}}", "{{account}}")],
            width=12,
        )
        .mappings(status_mappings())
        .thresholds(thresholds((None, "green"), (1, "orange"), (3, "red")))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .data_links([account_link()])
    )
    board.with_panel(
        timeseries(
            "Account equity",
            "accountEquity per account, in USD.",
            "currencyUSD",
            [query(f"binance_pm_account_equity_usd{{{sel}}}", "{{account}}")],
        )
    )
    board.with_panel(
        timeseries(
            "uniMMR",
            "Unified maintenance margin ratio per account; the shaded bands are the alert "
            f"thresholds ({UNI_MMR_CRITICAL} critical, {UNI_MMR_WARNING} warning).",
            "none",
            [query(f"binance_pm_uni_mmr{{{sel}}}", "{{account}}")],
        )
        .thresholds(uni_mmr_thresholds())
        .thresholds_style(
            common_b.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.LINE_AND_AREA
            )
        )
    )

    usd_overview_panels(board, sel)

    board.with_row(dash_b.Row("Balances"))
    board.with_panel(
        table_b.Panel()
        .title("Negative balances")
        .description(
            "Amount owed per account and asset: the absolute value of negativeBalance "
            "(GET /papi/v1/balance; Binance does not document its sign). Red when not 0."
        )
        .unit("short")
        .datasource(DATASOURCE)
        .targets([query(f"abs(binance_pm_negative_balance{{{sel}}})", instant=True)])
        .with_transformation(organize(["Time", "job", "instance"], {"Value": "Amount owed"}))
        .sort_by([common_b.TableSortByFieldState().display_name("Amount owed").desc(True)])
        .thresholds(thresholds((None, "transparent"), (1e-12, "red")))
        .override_by_name(
            "Amount owed",
            [
                dash.DynamicConfigValue(
                    id_val="custom.cellOptions",
                    value={"type": "color-background", "mode": "basic"},
                )
            ],
        )
        .height(8)
        .span(8)
    )
    board.with_panel(
        table_b.Panel()
        .title("Borrowed and interest by asset")
        .description(
            "crossMarginBorrowed and crossMarginInterest summed over all accounts, per asset "
            "(in units of the asset)."
        )
        .unit("short")
        .datasource(DATASOURCE)
        .targets(
            [
                query(f"asset:{name}:sum{{{sel}}}", ref=ref, instant=True)
                for name, ref in (
                    ("binance_pm_cross_margin_borrowed", "A"),
                    ("binance_pm_cross_margin_interest", "B"),
                )
            ]
        )
        .with_transformation(dash.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            organize(
                ["Time", "job", "instance"],
                {"Value #A": "Borrowed", "Value #B": "Interest"},
            )
        )
        .sort_by([common_b.TableSortByFieldState().display_name("Borrowed").desc(True)])
        .height(8)
        .span(8)
    )
    board.with_panel(
        timeseries(
            "Borrowed by account and asset",
            "crossMarginBorrowed per account and asset (in units of the asset).",
            "short",
            [query(f"binance_pm_cross_margin_borrowed{{{sel}}}", "{{account}} {{asset}}")],
            width=8,
        )
    )
    board.with_panel(
        timeseries(
            "Cross margin interest by asset",
            "crossMarginInterest summed over all accounts, per asset (in units of the asset).",
            "short",
            [query(f"asset:binance_pm_cross_margin_interest:sum{{{sel}}}", "{{asset}}")],
        )
    )
    board.with_panel(
        timeseries(
            "Unrealized PnL by asset",
            "umUnrealizedPNL and cmUnrealizedPNL summed over all accounts, per asset (in "
            "units of the asset: UM is margined in stablecoins, CM in coins).",
            "short",
            [
                query(f"asset:binance_pm_um_unrealized_pnl:sum{{{sel}}}", "UM {{asset}}", "A"),
                query(f"asset:binance_pm_cm_unrealized_pnl:sum{{{sel}}}", "CM {{asset}}", "B"),
            ],
        )
    )
    return limit_to_desks(finish(board))


def account_link() -> dash_b.DashboardLink:
    return (
        dash_b.DashboardLink("Account detail")
        .type(dash.DashboardLinkType.LINK)
        .url(
            "/d/binance-pm-account/binance-pm-account-detail?${datasource:queryparam}"
            "&${job:queryparam}&${instance:queryparam}&var-account=${__field.labels.account}"
        )
        .keep_time(True)
    )


def organize(exclude: list[str], rename: dict[str, str]) -> dash.DataTransformerConfig:
    return dash.DataTransformerConfig(
        id_val="organize",
        options={
            "excludeByName": dict.fromkeys(exclude, True),
            "renameByName": rename,
        },
    )


def account_detail() -> dict[str, Any]:
    acc = f'{TARGET}, account="$account"'
    asset = f'{acc}, asset=~"$asset"'
    board = new_dashboard(
        "binance-pm-account",
        "Binance PM / Account detail",
        "One Binance Portfolio Margin account: risk, status, and every per-asset field "
        "of GET /papi/v1/balance.",
    ).variables(variables(account="single"))

    board.with_row(dash_b.Row("Account"))
    board.with_panel(
        stat(
            "uniMMR",
            "Unified maintenance margin ratio (uniMMR): lower is riskier. Orange below "
            f"{UNI_MMR_WARNING}, red below {UNI_MMR_CRITICAL}; Binance liquidates at 1.05.",
            "none",
            [query(f"binance_pm_uni_mmr{{{acc}}}", "uniMMR")],
            width=4,
        )
        .decimals(3)
        .thresholds(uni_mmr_thresholds())
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )
    board.with_panel(
        stat(
            "Status",
            "accountStatus (GET /papi/v1/account).",
            "none",
            [query(f"account:binance_pm_account_status:code{{{acc}}}", "status")],
            width=4,
        )
        .mappings(status_mappings())
        .thresholds(thresholds((None, "green"), (1, "orange"), (3, "red")))
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )
    for field in ACCOUNT_USD_FIELDS[:3]:
        board.with_panel(
            stat(
                field.title,
                f"{field.api} in USD ({fields.ACCOUNT_ENDPOINT}).",
                "currencyUSD",
                [query(f"{field.metric}{{{acc}}}", field.title)],
                width=4,
            ).color_mode(common.BigValueColorMode.NONE)
        )
    board.with_panel(
        stat(
            "Account data age",
            "Time since Binance last updated the account data (updateTime of "
            "GET /papi/v1/account).",
            "s",
            [query(f"time() - binance_pm_account_update_timestamp_seconds{{{acc}}}", "age")],
            width=4,
        ).color_mode(common.BigValueColorMode.NONE)
    )
    board.with_panel(
        timeseries(
            "Equity and margin",
            "The USD fields of GET /papi/v1/account: equity, margins, available balance, "
            "open loss and the virtual maximum withdrawal.",
            "currencyUSD",
            [
                query(f"{f.metric}{{{acc}}}", f.title, chr(ord("A") + i))
                for i, f in enumerate(ACCOUNT_USD_FIELDS)
            ],
        )
    )
    board.with_panel(
        timeseries(
            "uniMMR",
            "uniMMR over time; the shaded bands are the default alert thresholds "
            f"({UNI_MMR_CRITICAL} critical, {UNI_MMR_WARNING} warning), the dashed lines "
            "the account's own (accounts[].thresholds), which its alerts use instead.",
            "none",
            [
                query(f"binance_pm_uni_mmr{{{acc}}}", "uniMMR", "A"),
                query(f"binance_pm_account_threshold{{{acc}}}", "{{threshold}}", "B"),
            ],
            width=6,
        )
        .thresholds(uni_mmr_thresholds())
        .thresholds_style(
            common_b.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.LINE_AND_AREA
            )
        )
    )
    board.with_panel(
        statetimeline_b.Panel()
        .title("Status history")
        .description("accountStatus over time.")
        .unit("none")
        .datasource(DATASOURCE)
        .targets([query(f"account:binance_pm_account_status:code{{{acc}}}", "status")])
        .mappings(status_mappings())
        .thresholds(thresholds((None, "green"), (1, "orange"), (3, "red")))
        .height(8)
        .span(6)
    )

    usd_account_panels(board, acc, asset)
    futures_margin_panels(board, acc)

    board.with_row(dash_b.Row("Assets"))
    table_targets: list[Any] = [
        query(f"{f.metric}{{{asset}}}", f.title, chr(ord("A") + i), instant=True)
        for i, f in enumerate(fields.BALANCE)
    ]
    board.with_panel(
        table_b.Panel()
        .title("Balances by asset")
        .description(
            "Every field of GET /papi/v1/balance for the selected assets, in units of the "
            "asset. Empty cells: Binance sent an empty string."
        )
        .unit("short")
        .datasource(DATASOURCE)
        .targets(table_targets)
        .with_transformation(dash.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            organize(
                ["Time", "job", "instance", "account"],
                {f"Value #{chr(ord('A') + i)}": f.title for i, f in enumerate(fields.BALANCE)},
            )
        )
        .sort_by([common_b.TableSortByFieldState().display_name("Wallet balance").desc(True)])
        .override_by_name(
            "Negative balance",
            [
                dash.DynamicConfigValue(
                    id_val="custom.cellOptions",
                    value={"type": "color-background", "mode": "basic"},
                ),
                dash.DynamicConfigValue(
                    id_val="thresholds",
                    value={
                        "mode": "absolute",
                        "steps": [
                            {"value": None, "color": "red"},
                            {"value": -1e-12, "color": "transparent"},
                            {"value": 1e-12, "color": "red"},
                        ],
                    },
                ),
            ],
        )
        .height(10)
        .span(24)
    )
    for field in fields.BALANCE:
        board.with_panel(
            timeseries(
                field.title,
                f"{field.api} per asset ({fields.BALANCE_ENDPOINT}), in units of the asset.",
                "short",
                [query(f"{field.metric}{{{asset}}}", "{{asset}}")],
                width=8,
            )
        )
    board.with_panel(
        timeseries(
            "Balance data age",
            "Time since Binance last updated each asset's balance (updateTime of "
            "GET /papi/v1/balance).",
            "s",
            [
                query(
                    f"time() - binance_pm_balance_update_timestamp_seconds{{{asset}}}",
                    "{{asset}}",
                )
            ],
            width=8,
        )
    )
    return finish(board)


def futures_margin_panels(board: dash_b.Dashboard, acc: str) -> None:
    """The "Futures margin" row: which futures positions and assets hold the account's
    maintenance margin (GET /papi/v1/um/account and /papi/v1/cm/account; empty unless
    collect.um_account or collect.cm_account is on)."""
    board.with_row(dash_b.Row("Futures margin"))
    share = "position:binance_pm_maint_margin_share:ratio"
    margin = "position:binance_pm_position_maint_margin_usd"
    board.with_panel(
        table_b.Panel()
        .title("Top positions by maintenance margin")
        .description(
            "The 10 open futures positions holding the most maintenance margin, in USD "
            f"({margin}: maintMargin of GET /papi/v1/um/account and /papi/v1/cm/account, "
            "a CM position's valued at its coin's spot price), and each one's share of the "
            "account's maintenance margin (accountMaintMargin). Empty unless "
            "collect.um_account or collect.cm_account is on."
        )
        .unit("short")
        .datasource(DATASOURCE)
        .targets(
            [
                query(f"topk(10, {margin}{{{acc}}})", "margin", "A", instant=True),
                query(f"{share}{{{acc}}}", "share", "B", instant=True),
            ]
        )
        .with_transformation(dash.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            organize(
                ["Time", "job", "instance", "account"],
                {"Value #A": "Maint. margin (USD)", "Value #B": "Share of the account's"},
            )
        )
        .sort_by([common_b.TableSortByFieldState().display_name("Maint. margin (USD)").desc(True)])
        .override_by_name(
            "Share of the account's",
            [dash.DynamicConfigValue(id_val="unit", value="percentunit")],
        )
        .height(8)
        .span(12)
    )
    board.with_panel(
        timeseries(
            "Largest positions' share of maintenance margin",
            f"The 5 largest shares ({share}) over time: BinancePMPositionDominatesMargin "
            "warns above 0.5 while uniMMR is below its warning threshold.",
            "percentunit",
            [query(f"topk(5, {share}{{{acc}}})", "{{book}} {{symbol}} {{position_side}}")],
            width=12,
        )
    )
    for book, fields_of_book in (("um", fields.UM_ASSETS), ("cm", fields.CM_ASSETS)):
        maint = next(f for f in fields_of_book if f.api == "maintMargin")
        board.with_panel(
            timeseries(
                f"{book.upper()} maintenance margin per asset",
                f"maintMargin of assets[] ({maint.metric}), in units of the asset.",
                "short",
                [query(f"{maint.metric}{{{acc}}}", "{{asset}}")],
                width=12,
            )
        )


# --- USD values (prices from the exporter, multiplied by the recording rules) ----------

# Per-account USD sums of prometheus/alerts.yml: (recording rule, title).
USD_TOTALS: list[tuple[str, str]] = [
    ("account:binance_pm_net_usd:sum", "Net"),
    ("account:binance_pm_wallet_balance_usd:sum", "Wallet"),
    ("account:binance_pm_cross_margin_borrowed_usd:sum", "Borrowed"),
    ("account:binance_pm_cross_margin_interest_usd:sum", "Interest"),
    ("account:binance_pm_negative_balance_usd:sum", "Negative balance"),
    ("account:binance_pm_um_unrealized_pnl_usd:sum", "UM unrealized PnL"),
    ("account:binance_pm_cm_unrealized_pnl_usd:sum", "CM unrealized PnL"),
]
# Per-asset amounts shown in USD on the Account detail dashboard: (metric, title).
ASSET_USD_FIELDS: list[tuple[str, str]] = [
    ("binance_pm_wallet_balance", "Wallet"),
    ("binance_pm_cross_margin_borrowed", "Borrowed"),
    ("binance_pm_cross_margin_interest", "Interest"),
    ("binance_pm_negative_balance", "Negative balance"),
    ("binance_pm_um_unrealized_pnl", "UM unrealized PnL"),
    ("binance_pm_cm_unrealized_pnl", "CM unrealized PnL"),
]
USD_NOTE = (
    "Valued at the last spot prices (binance_pm_asset_price_usd, README: USD values); "
    "assets without a price are left out."
)


def in_usd(amount: str, sel: str) -> str:
    """A per-asset amount times its asset's price, as the recording rules join them."""
    return f"{amount} * on (job, instance, asset) group_left binance_pm_asset_price_usd{{{sel}}}"


def usd_overview_panels(board: dash_b.Dashboard, sel: str) -> None:
    """The desk's totals in USD and each account's, on the Overview."""
    board.with_row(dash_b.Row("USD (at spot prices)"))
    grand = [
        ("Net, all accounts", "account:binance_pm_net_usd:sum", "Assets minus liabilities"),
        ("Borrowed, all accounts", "account:binance_pm_cross_margin_borrowed_usd:sum",
         "Cross margin borrowed"),
        ("Interest, all accounts", "account:binance_pm_cross_margin_interest_usd:sum",
         "Cross margin interest"),
        ("Negative balances, all accounts", "account:binance_pm_negative_balance_usd:sum",
         "Negative balances (any sign)"),
    ]  # fmt: skip
    for title, rule, what in grand:
        panel = stat(
            title,
            f"{what} of every account together, in USD. {USD_NOTE}",
            "currencyUSD",
            [query(f"sum({rule}{{{sel}}})", title)],
            width=5,
        )
        if rule == "account:binance_pm_negative_balance_usd:sum":
            panel = panel.thresholds(thresholds((None, "green"), (1e-9, "red")))
            panel = panel.color_mode(common.BigValueColorMode.BACKGROUND)
        else:
            panel = panel.color_mode(common.BigValueColorMode.NONE)
        board.with_panel(panel)
    board.with_panel(
        stat(
            "Unrealized PnL, all accounts",
            f"UM and CM unrealized PnL of every account together, in USD. {USD_NOTE}",
            "currencyUSD",
            [
                query(
                    f"sum(account:binance_pm_um_unrealized_pnl_usd:sum{{{sel}}})"
                    f" + (sum(account:binance_pm_cm_unrealized_pnl_usd:sum{{{sel}}}) or vector(0))",
                    "unrealized PnL",
                )
            ],
            width=4,
        ).color_mode(common.BigValueColorMode.NONE)
    )
    board.with_panel(
        table_b.Panel()
        .title("USD by account")
        .description(
            "Per account: net (wallet + UM and CM unrealized PnL - borrowed - interest - "
            f"negative balance), and each part, in USD. {USD_NOTE}"
        )
        .unit("currencyUSD")
        .datasource(DATASOURCE)
        .targets(
            [
                query(f"{rule}{{{sel}}}", ref=chr(ord("A") + i), instant=True)
                for i, (rule, _) in enumerate(USD_TOTALS)
            ]
        )
        .with_transformation(dash.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            organize(
                ["Time", "job", "instance"],
                {f"Value #{chr(ord('A') + i)}": title for i, (_, title) in enumerate(USD_TOTALS)},
            )
        )
        .sort_by([common_b.TableSortByFieldState().display_name("Net").desc(True)])
        .height(8)
        .span(12)
    )
    board.with_panel(
        timeseries(
            "Net USD by account",
            f"Assets minus liabilities per account, in USD. {USD_NOTE}",
            "currencyUSD",
            [query(f"account:binance_pm_net_usd:sum{{{sel}}}", "{{account}}")],
        )
    )
    board.with_panel(
        timeseries(
            "Borrowed and negative balances in USD by account",
            f"Cross margin borrowed and negative balances per account, in USD. {USD_NOTE}",
            "currencyUSD",
            [
                query(
                    f"account:binance_pm_cross_margin_borrowed_usd:sum{{{sel}}}",
                    "borrowed {{account}}",
                    "A",
                ),
                query(
                    f"account:binance_pm_negative_balance_usd:sum{{{sel}}}",
                    "negative {{account}}",
                    "B",
                ),
            ],
        )
    )
    board.with_panel(
        timeseries(
            "Unrealized PnL in USD by account",
            f"UM and CM unrealized PnL per account, in USD. {USD_NOTE}",
            "currencyUSD",
            [
                query(
                    f"account:binance_pm_um_unrealized_pnl_usd:sum{{{sel}}}", "UM {{account}}", "A"
                ),
                query(
                    f"account:binance_pm_cm_unrealized_pnl_usd:sum{{{sel}}}", "CM {{account}}", "B"
                ),
            ],
        )
    )


def usd_account_panels(board: dash_b.Dashboard, acc: str, asset: str) -> None:
    """The account's USD totals, and each asset's USD value beside its amount."""
    board.with_row(dash_b.Row("USD (at spot prices)"))
    for rule, title in USD_TOTALS[:5]:
        board.with_panel(
            stat(
                f"{title} (USD)",
                f"{title} of the account, in USD ({rule}). {USD_NOTE}",
                "currencyUSD",
                [query(f"{rule}{{{acc}}}", title)],
                width=4,
            ).color_mode(common.BigValueColorMode.NONE)
        )
    board.with_panel(
        stat(
            "Price age",
            "Age of the oldest spot price behind the selected assets' USD values "
            "(binance_pm_price_update_timestamp_seconds); BinancePMPricesStale fires past 5 min.",
            "s",
            [
                query(
                    f"max(time() - (binance_pm_wallet_balance{{{asset}}} * 0"
                    " + on (job, instance, asset) group_left"
                    f" binance_pm_price_update_timestamp_seconds{{{TARGET}}}))",
                    "age",
                )
            ],
            width=4,
        ).color_mode(common.BigValueColorMode.NONE)
    )
    targets: list[Any] = [
        query(f"binance_pm_wallet_balance{{{asset}}}", "Wallet amount", "A", instant=True),
        query(f"binance_pm_wallet_balance{{{asset}}} * 0 + on (job, instance, asset) group_left "
              f"binance_pm_asset_price_usd{{{TARGET}}}", "Price", "B", instant=True),
    ]  # fmt: skip
    targets += [
        query(in_usd(f"{metric}{{{asset}}}", TARGET), title, chr(ord("C") + i), instant=True)
        for i, (metric, title) in enumerate(ASSET_USD_FIELDS)
    ]
    rename = {"Value #A": "Wallet (amount)", "Value #B": "Price (USD)"}
    rename |= {
        f"Value #{chr(ord('C') + i)}": f"{title} (USD)"
        for i, (_, title) in enumerate(ASSET_USD_FIELDS)
    }
    board.with_panel(
        table_b.Panel()
        .title("USD value by asset")
        .description(
            "Each selected asset's wallet amount, its price, and its amounts in USD "
            f"(amount x price). {USD_NOTE}"
        )
        .unit("currencyUSD")
        .datasource(DATASOURCE)
        .targets(targets)
        .with_transformation(dash.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(organize(["Time", "job", "instance", "account"], rename))
        .sort_by([common_b.TableSortByFieldState().display_name("Wallet (USD)").desc(True)])
        .override_by_name(
            "Wallet (amount)", [dash.DynamicConfigValue(id_val="unit", value="short")]
        )
        .height(10)
        .span(16)
    )
    board.with_panel(
        timeseries(
            "Wallet in USD by asset",
            f"totalWalletBalance x price per asset, in USD. {USD_NOTE}",
            "currencyUSD",
            [query(in_usd(f"binance_pm_wallet_balance{{{asset}}}", TARGET), "{{asset}}")],
            width=8,
        )
    )


def exporter_health() -> dict[str, Any]:
    sel = TARGET
    acc = f'{TARGET}, account=~"$account"'
    board = new_dashboard(
        "binance-pm-exporter",
        "Binance PM / Exporter health",
        "binance-pm-exporter itself: scrape and account health, data age, its memory, CPU "
        "and open files, request-weight budget, request outcomes and latency, pauses.",
    ).variables(variables(account="multi"))

    board.with_row(dash_b.Row("Health"))
    board.with_panel(
        stat(
            "Scrape up",
            "Prometheus's `up` for each exporter target: 0 when the scrape fails "
            "(BinancePMExporterDown).",
            "none",
            [query(f"up{{{sel}}}", "{{instance}}")],
            width=4,
        )
        .mappings(up_mappings())
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
    )
    board.with_panel(
        stat(
            "Exporter version",
            "binance_pm_exporter_build_info: the version each target runs.",
            "none",
            [query(f"binance_pm_exporter_build_info{{{sel}}}", "{{version}}")],
            width=4,
        )
        .text_mode(common.BigValueTextMode.NAME)
        .color_mode(common.BigValueColorMode.NONE)
    )
    board.with_panel(
        stat(
            "Refresh interval",
            "binance_pm_refresh_interval_seconds: how often each account is refreshed, from "
            "the weight budget and min_interval_seconds.",
            "s",
            [query(f"max(binance_pm_refresh_interval_seconds{{{sel}}})", "interval")],
            width=4,
        ).color_mode(common.BigValueColorMode.NONE)
    )
    board.with_panel(
        statetimeline_b.Panel()
        .title("Account up")
        .description(
            "binance_pm_up per account: 1 when the last refresh succeeded "
            "(BinancePMAccountFailing after 5 minutes at 0)."
        )
        .unit("none")
        .datasource(DATASOURCE)
        .targets([query(f"binance_pm_up{{{acc}}}", "{{account}}")])
        .mappings(up_mappings())
        .thresholds(thresholds((None, "red"), (1, "green")))
        .height(5)
        .span(12)
    )
    board.with_panel(
        timeseries(
            "Age of the last successful refresh",
            "Seconds since each account's last successful refresh "
            "(binance_pm_last_success_timestamp_seconds), beside the target refresh interval; "
            "BinancePMDataStale fires past 5 intervals.",
            "s",
            [
                query(
                    f"time() - binance_pm_last_success_timestamp_seconds{{{acc}}}",
                    "{{account}}",
                    "A",
                ),
                query(f"max(binance_pm_refresh_interval_seconds{{{sel}}})", "target interval", "B"),
            ],
        )
    )
    board.with_panel(
        timeseries(
            "Consecutive failures",
            "binance_pm_account_consecutive_failures: failed refreshes in a row per account "
            "(the exporter backs off exponentially).",
            "none",
            [query(f"binance_pm_account_consecutive_failures{{{acc}}}", "{{account}}")],
        )
    )

    board.with_row(dash_b.Row("Process: memory, CPU, open files"))
    board.with_panel(
        timeseries(
            "Memory",
            "Resident memory of each exporter (process_resident_memory_bytes) against the "
            "memory limit of its cgroup (binance_pm_exporter_memory_limit_bytes: the "
            "container's or the systemd unit's; absent without one). "
            "BinancePMExporterMemoryHigh fires above 80 % of the limit for 10 minutes.",
            "bytes",
            [
                query(f"process_resident_memory_bytes{{{sel}}}", "resident {{instance}}", "A"),
                query(
                    f"binance_pm_exporter_memory_limit_bytes{{{sel}}}", "limit {{instance}}", "B"
                ),
            ],
            width=8,
        ).min(0)
    )
    board.with_panel(
        timeseries(
            "CPU",
            "CPU time each exporter uses per second (rate of process_cpu_seconds_total): "
            "1 is one core.",
            "percentunit",
            [
                query(
                    f"rate(process_cpu_seconds_total{{{sel}}}[$__rate_interval])",
                    "{{instance}}",
                )
            ],
            width=8,
        ).min(0)
    )
    board.with_panel(
        timeseries(
            "Open files",
            "Files and sockets each exporter has open (process_open_fds) against its "
            "open-files limit (process_max_fds, ulimit -n). BinancePMExporterOpenFilesHigh "
            "fires above 80 % of the limit for 10 minutes.",
            "none",
            [
                query(f"process_open_fds{{{sel}}}", "open {{instance}}", "A"),
                query(f"process_max_fds{{{sel}}}", "limit {{instance}}", "B"),
            ],
            width=8,
        ).min(0)
    )

    board.with_row(dash_b.Row("Request weight"))
    board.with_panel(
        timeseries(
            "Weight per minute: spent, budget, IP-wide",
            "Request weight per minute per egress: what this exporter spends "
            "(rate of binance_pm_weight_spent_total), its budget "
            "(ip_weight_limit_per_minute x share), and X-MBX-USED-WEIGHT-1M, the weight "
            "of every client on the IP in the current minute.",
            "short",
            [
                query(
                    f"sum by (egress) (rate(binance_pm_weight_spent_total{{{sel}}}"
                    "[$__rate_interval])) * 60",
                    "spent {{egress}}",
                    "A",
                ),
                query(f"binance_pm_weight_budget_per_minute{{{sel}}}", "budget {{egress}}", "B"),
                query(f"binance_pm_ip_used_weight{{{sel}}}", "IP-wide used {{egress}}", "C"),
            ],
            width=24,
        )
    )

    board.with_row(dash_b.Row("Requests"))
    board.with_panel(
        timeseries(
            "Requests by outcome",
            "Requests to the Binance API per second, by endpoint and outcome "
            "(binance_pm_requests_total).",
            "reqps",
            [
                query(
                    f"sum by (endpoint, outcome) (rate(binance_pm_requests_total{{{sel}}}"
                    "[$__rate_interval]))",
                    "{{endpoint}} {{outcome}}",
                )
            ],
            width=8,
        )
    )
    requests = f"sum by (endpoint) (rate(binance_pm_requests_total{{{sel}}}[$__rate_interval]))"
    failed = requests.replace(f"{{{sel}}}", f'{{{sel}, outcome!="success"}}')
    board.with_panel(
        timeseries(
            "Error ratio",
            "Share of requests to the Binance API whose outcome is not success, by endpoint.",
            "percentunit",
            [
                query(
                    # 0 rather than no data while every request succeeds
                    f"({failed}\nor\n{requests} * 0)\n/ {requests}",
                    "{{endpoint}}",
                )
            ],
            width=8,
        ).min(0)
    )
    board.with_panel(
        timeseries(
            "Request latency",
            "Quantiles of the duration of requests to the Binance API, by endpoint "
            "(binance_pm_request_duration_seconds).",
            "s",
            [
                query(
                    f"histogram_quantile({q}, sum by (le, endpoint) "
                    f"(rate(binance_pm_request_duration_seconds_bucket{{{sel}}}"
                    "[$__rate_interval])))",
                    f"p{round(q * 100)} {{{{endpoint}}}}",
                    ref,
                )
                for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))
            ],
            width=8,
        )
    )

    board.with_row(dash_b.Row("User data streams"))
    board.with_panel(
        statetimeline_b.Panel()
        .title("Stream up")
        .description(
            "binance_pm_stream_up per account: 1 while its user data stream is connected "
            "(BinancePMStreamDown after 10 minutes at 0 while REST works). Absent with "
            "stream.enabled: false."
        )
        .unit("none")
        .datasource(DATASOURCE)
        .targets([query(f"binance_pm_stream_up{{{acc}}}", "{{account}}")])
        .mappings(up_mappings())
        .thresholds(thresholds((None, "red"), (1, "green")))
        .height(8)
        .span(12)
    )
    board.with_panel(
        timeseries(
            "Event-triggered refreshes",
            "Reads started ahead of their turn by an event on the account's stream, per "
            "minute and endpoint read (binance_pm_stream_triggered_refreshes_total: a "
            "balance event reads the balance alone, a risk event the account too; a read "
            "of both counts once under each); they take at most half of the budget. Events "
            "by type: binance_pm_stream_events_total; reconnects by reason: "
            "binance_pm_stream_reconnects_total.",
            "none",
            [
                query(
                    "sum by (account, endpoint) (rate(binance_pm_stream_triggered_refreshes_total"
                    f"{{{acc}}}[$__rate_interval])) * 60",
                    "{{account}} {{endpoint}}",
                )
            ],
        )
    )

    board.with_row(dash_b.Row("Pauses"))
    board.with_panel(
        timeseries(
            "Pause remaining",
            "Seconds until requests resume per egress after a 429, a 418 ban or IP-wide "
            "weight above the high-water mark (binance_pm_paused_until_timestamp_seconds); "
            "0 when not paused.",
            "s",
            [
                query(
                    f"clamp_min(binance_pm_paused_until_timestamp_seconds{{{sel}}} - time(), 0)",
                    "{{egress}}",
                )
            ],
        )
    )
    board.with_panel(
        timeseries(
            "Pauses",
            "Pauses started per egress and reason (high_water, rate_limited, banned, "
            "waf_blocked), from binance_pm_pauses_total.",
            "none",
            [
                query(
                    f"sum by (egress, reason) (increase(binance_pm_pauses_total{{{sel}}}"
                    "[$__rate_interval]))",
                    "{{egress}} {{reason}}",
                )
            ],
        )
    )
    return finish(board)


BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "overview": overview,
    "account": account_detail,
    "exporter": exporter_health,
}


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{name}.json": render(build()) for name, build in BUILDERS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--out", type=Path, default=DASHBOARDS_DIR, help="output folder")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generate().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python grafana/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
