"""The field table (exporter/fields.py) is the one place the API fields and their metrics are
written: the README's metric table agrees with it and with what /metrics serves, and the
modules on the scrape side do not reach into the Binance client to get it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from support.harness import accounts, sim_config

from exporter import fields
from exporter.app import WEB_CONFIG_NAMES, Exporter
from exporter.collector import FAMILIES
from exporter.processmetrics import MemoryLimitCollector
from exporter.selfmetrics import ReloadCollector, ReloadStatus

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "exporter"


def readme_metric_rows() -> list[str]:
    """The rows of the README's "What you get" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## What you get\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def names_in(cell: str) -> set[str]:
    return set(re.findall(r"`([a-z_:][a-z0-9_:]*)`", cell))


def served_metric_names() -> set[str]:
    """Every metric family /metrics serves, named as in the text format."""
    url = "http://127.0.0.1:1"
    exporter = Exporter(sim_config(url, accounts(1), stream_url="ws://127.0.0.1:1/pm/ws"))
    # serve_http adds the web config's reload state when there is a --web.config.file
    web = ReloadCollector(ReloadStatus(successful=True, last_success=0.0), *WEB_CONFIG_NAMES)
    # and the cgroup's memory limit, where there is one
    limit = ROOT / "tests" / "fixtures" / "cgroup_memory_max"
    live = {
        metric.name + "_total" if metric.type == "counter" else metric.name
        for metric in (
            *exporter.registry.collect(),
            *web.collect(),
            *MemoryLimitCollector(limit).collect(),
        )
    }
    return live | {family.name for family in FAMILIES}


MARGIN_TABLES = (fields.UM_ASSETS, fields.UM_POSITIONS, fields.CM_ASSETS, fields.CM_POSITIONS)


def test_every_field_of_the_table_is_served() -> None:
    served = {family.name for family in FAMILIES}
    for table in ((*fields.BALANCE, *fields.ACCOUNT), *MARGIN_TABLES):
        assert {f.metric for f in table} <= served
        assert len({f.metric for f in table}) == len({f.api for f in table}) == len(table)


def test_readme_lists_every_metric_served_and_no_other() -> None:
    listed = set().union(*(names_in(row.split(" | ")[0]) for row in readme_metric_rows()))
    assert listed == served_metric_names()


def test_readme_names_each_metrics_api_field_in_its_row() -> None:
    rows = readme_metric_rows()
    for field in (*fields.BALANCE, *fields.ACCOUNT, *(f for t in MARGIN_TABLES for f in t)):
        row = next(r for r in rows if field.metric in names_in(r.split(" | ")[0]))
        assert f"`{field.api}`" in row, (field.metric, field.api)


def test_the_status_code_rule_numbers_the_known_statuses_in_their_order() -> None:
    data = yaml.safe_load((ROOT / "prometheus" / "alerts.yml").read_text())
    rule = next(
        r
        for group in data["groups"]
        for r in group["rules"]
        if r.get("record") == "account:binance_pm_account_status:code"
    )
    coded = re.findall(r'status="([A-Z_]+)"\} == 1\) \* (\d+)', rule["expr"])
    assert coded == [(s, str(i)) for i, s in enumerate(fields.ACCOUNT_STATUSES)]
    unknown = re.search(r'status!~"([A-Z_|]+)"\} == 1\) \* (\d+)', rule["expr"])
    assert unknown is not None
    assert unknown.groups() == ("|".join(fields.ACCOUNT_STATUSES), str(len(coded)))
