"""The Prometheus rules in prometheus/alerts.yml: valid, unit-tested, documented."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.systools import require

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "prometheus" / "alerts.yml"
RULE_TESTS = sorted((ROOT / "prometheus" / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = (
    "https://github.com/binance-pm-exporter/binance-pm-exporter/blob/main/docs/runbook.md#"
)
SEVERITIES = {"critical", "warning", "info"}


def _promtool() -> str:
    return require("promtool")


def _alerts() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def _rule_test_cases() -> list[dict[str, Any]]:
    cases = []
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            cases.extend(test.get("alert_rule_test", []))
    return cases


def _github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub generates for the headings of a Markdown document."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.slow
def test_promtool_unit_tests() -> None:
    assert RULE_TESTS, "no rule unit tests in prometheus/tests/"
    result = subprocess.run(
        [_promtool(), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_severity_annotations_and_runbook() -> None:
    anchors = _github_anchors(RUNBOOK.read_text())
    alerts = _alerts()
    assert len(alerts) >= 9
    for rule in alerts:
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key), f"{name}: missing annotation {key}"
        url = annotations["runbook_url"]
        assert url.startswith(RUNBOOK_URL), f"{name}: runbook_url {url}"
        anchor = url.removeprefix(RUNBOOK_URL)
        assert anchor in anchors, f"{name}: no heading for #{anchor} in docs/runbook.md"


def _table_rows(markdown: str) -> list[tuple[str, str]]:
    """(first cell, severity cell) of every table row whose first cell names an alert."""
    rows = []
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| BinancePM") and len(cells) >= 2:
            rows.append((cells[0], cells[1]))
    return rows


def test_the_readme_and_runbook_tables_name_the_alerts_there_are() -> None:
    """The README's alert table lists every alert with its severity; the runbook's
    thresholds table names no alert that is not there."""
    alerts = {rule["alert"]: rule["labels"]["severity"] for rule in _alerts()}
    assert dict(_table_rows((ROOT / "README.md").read_text())) == alerts
    thresholds = {name for cell, _ in _table_rows(RUNBOOK.read_text()) for name in cell.split(", ")}
    assert thresholds <= set(alerts)


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in _alerts()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_is_tested_firing_and_silent(rule: dict[str, Any]) -> None:
    cases = [case for case in _rule_test_cases() if case["alertname"] == rule["alert"]]
    assert any(case.get("exp_alerts") for case in cases), f"{rule['alert']}: no firing test"
    assert any(not case.get("exp_alerts") for case in cases), f"{rule['alert']}: no silent test"


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: rule["alert"])
def test_annotations_name_the_account_and_asset(rule: dict[str, Any]) -> None:
    """Whatever identifying label the tested alert carries, summary and description name it."""
    expected = [
        alert["exp_labels"]
        for case in _rule_test_cases()
        if case["alertname"] == rule["alert"]
        for alert in case.get("exp_alerts") or []
    ]
    keys = {key for labels in expected for key in labels} & {"account", "asset", "egress"}
    if not keys:
        keys = {"instance"}
    for key in sorted(keys):
        for annotation in ("summary", "description"):
            text = rule["annotations"][annotation]
            assert f"$labels.{key}" in text, f"{rule['alert']}: {annotation} does not name {key}"


#: how each account alert copies the account's own labels, and keeps firing without them
JOIN = "* on (job, instance, account) group_left (desk, team) binance_pm_account_info"
FALLBACK = "or on (job, instance, account)"


def _unjoined(expr: str) -> str:
    """The condition an account alert wraps in the label join: `(E) JOIN or on (...) (E)`."""
    text = " ".join(expr.split())
    match = re.fullmatch(rf"\((.*)\) {re.escape(JOIN)} {re.escape(FALLBACK)} \((.*)\)", text)
    assert match, text
    assert match.group(1) == match.group(2), "the two halves must be the same condition"
    return match.group(1).strip()


ACCOUNT_ALERTS = (
    "BinancePMNegativeBalance",
    "BinancePMNegativeBalanceLarge",
    "BinancePMUniMMRLow",
    "BinancePMUniMMRCritical",
    "BinancePMPositionDominatesMargin",
    "BinancePMAccountStatusNotNormal",
    "BinancePMAccountLiquidation",
    "BinancePMAccountFailing",
    "BinancePMStreamDown",
    "BinancePMStreamUnstable",
    "BinancePMDataStale",
)


@pytest.mark.parametrize("name", ACCOUNT_ALERTS)
def test_account_alerts_carry_the_accounts_labels(name: str) -> None:
    rule = next(r for r in _alerts() if r["alert"] == name)
    assert "binance_pm_account_info" not in _unjoined(rule["expr"])


def test_every_alert_on_account_series_is_joined() -> None:
    """An alert whose tests expect an `account` label is in ACCOUNT_ALERTS (joined)."""
    per_account = {
        case["alertname"]
        for case in _rule_test_cases()
        for alert in case.get("exp_alerts") or []
        if "account" in alert["exp_labels"]
    }
    assert per_account == set(ACCOUNT_ALERTS)


@pytest.mark.parametrize(
    ("name", "threshold", "default"),
    [
        ("BinancePMUniMMRLow", "uni_mmr_warning", "1.5"),
        ("BinancePMUniMMRCritical", "uni_mmr_critical", "1.2"),
    ],
)
def test_unimmr_alerts_use_the_accounts_threshold_or_the_default(
    name: str, threshold: str, default: str
) -> None:
    rule = next(r for r in _alerts() if r["alert"] == name)
    assert _unjoined(rule["expr"]) == (
        "binance_pm_uni_mmr < on (job, instance, account) ("
        f' binance_pm_account_threshold{{threshold="{threshold}"}}'
        f" or on (job, instance, account) 0 * binance_pm_uni_mmr + {default} )"
        " unless on (job, instance, account) binance_pm_maint_margin_usd == 0"
    )
    # the summary names the threshold used: the account's, else the default
    used = f'"{threshold}" | query }}}}{{{{ . | first | value }}}}'
    used += f"{{{{ else }}}}{default}{{{{ end }}}}"
    assert used in rule["annotations"]["summary"]


def test_negative_balance_alert_fires_at_once_on_any_sign() -> None:
    rule = next(r for r in _alerts() if r["alert"] == "BinancePMNegativeBalance")
    assert rule.get("for") in (None, "0s", "0m")
    assert rule["labels"]["severity"] == "critical"
    assert re.fullmatch(r"binance_pm_negative_balance\s*!=\s*0", _unjoined(rule["expr"]))


USD_RECORDS = {
    "account:binance_pm_wallet_balance_usd:sum": "binance_pm_wallet_balance",
    "account:binance_pm_cross_margin_borrowed_usd:sum": "binance_pm_cross_margin_borrowed",
    "account:binance_pm_cross_margin_interest_usd:sum": "binance_pm_cross_margin_interest",
    "account:binance_pm_negative_balance_usd:sum": "binance_pm_negative_balance",
    "account:binance_pm_um_unrealized_pnl_usd:sum": "binance_pm_um_unrealized_pnl",
    "account:binance_pm_cm_unrealized_pnl_usd:sum": "binance_pm_cm_unrealized_pnl",
}


def test_usd_rules_multiply_each_amount_by_its_price_per_account() -> None:
    data = yaml.safe_load(RULES.read_text())
    records = {r["record"]: r["expr"] for g in data["groups"] for r in g["rules"] if "record" in r}
    for record, amount in USD_RECORDS.items():
        expr = " ".join(records[record].split())
        assert amount in expr, record
        assert "* on (job, instance, asset) group_left binance_pm_asset_price_usd" in expr
        assert expr.startswith("sum without (asset)"), record
    assert "account:binance_pm_net_usd:sum" in records


def test_large_negative_balance_threshold_is_the_runbooks() -> None:
    rule = next(r for r in _alerts() if r["alert"] == "BinancePMNegativeBalanceLarge")
    match = re.fullmatch(
        r"account:binance_pm_negative_balance_usd:sum > (\d+)", _unjoined(rule["expr"])
    )
    assert match, rule["expr"]
    threshold = match.group(1)
    assert rule["labels"]["severity"] == "critical"
    assert f"more than {threshold} USD" in rule["annotations"]["description"]
    row = next(
        line
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("| BinancePMNegativeBalanceLarge |")
    )
    assert f"more than {threshold} USD" in row


ALERTING_DOC = ROOT / "docs" / "alerting.md"


def _alertmanager_config() -> str:
    text = ALERTING_DOC.read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) if "route:" in b]
    return block


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["desk=market-making", "severity=critical"], "mm-pager"),
        (["desk=market-making", "severity=warning"], "mm-chat"),
        (["desk=treasury", "severity=critical"], "treasury-pager"),
        (["severity=critical", "alertname=BinancePMExporterDown"], "ops-pager"),
        (["severity=warning", "alertname=BinancePMDataStale"], "default"),
    ],
)
def test_the_documented_route_sends_each_desk_to_its_receivers(
    tmp_path: Path, labels: list[str], receiver: str
) -> None:
    amtool = require("amtool")
    config = tmp_path / "alertmanager.yml"
    config.write_text(_alertmanager_config())
    result = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={config}", *labels],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_the_documented_join_is_the_rules() -> None:
    text = " ".join(ALERTING_DOC.read_text().split())
    assert JOIN in text
    assert FALLBACK in text
