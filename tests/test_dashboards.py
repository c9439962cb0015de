"""The Grafana dashboards: generated from grafana/generate.py, well-formed, valid PromQL."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from support.dashboard_queries import (
    DASHBOARDS_DIR,
    ROOT,
    label_values_variables,
    load_dashboards,
    panels,
    queries,
    substitute,
    used_variables,
    variable_names,
)
from support.systools import require
from test_fields import served_metric_names

EXPECTED_UIDS = {
    "overview.json": "binance-pm-overview",
    "account.json": "binance-pm-account",
    "exporter.json": "binance-pm-exporter",
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
CURRENT_SCHEMA_VERSION = 41  # Grafana 11.6 / 12.x

# The exporter's metrics (notes/contract.md, issue 2) and Prometheus's own `up`.
#: every series name a panel may read: what /metrics serves (README's table, checked by
#: test_fields), with the histogram's parts, and Prometheus's own `up`
EXPORTER_METRICS = {"up", *served_metric_names()} | {
    f"binance_pm_request_duration_seconds_{part}" for part in ("bucket", "count", "sum")
}
SAMPLE_VALUES = {"job": "binance-pm-exporter", "instance": "127.0.0.1:9745"}
SAMPLE_VALUES |= {"account": "desk-a", "asset": "USDT", "datasource": "prometheus"}
SAMPLE_VALUES |= {"desk": ".*"}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "grafana_generate", ROOT / "grafana" / "generate.py"
    )
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recording_rules() -> set[str]:
    data = yaml.safe_load((ROOT / "prometheus" / "alerts.yml").read_text())
    return {
        rule["record"] for group in data["groups"] for rule in group["rules"] if "record" in rule
    }


DASHBOARDS = load_dashboards()
ALL_QUERIES = [q for name, board in DASHBOARDS.items() for q in queries(name, board)]


def test_committed_json_is_a_fresh_generation() -> None:
    generated = _generator().generate()
    assert sorted(generated) == sorted(EXPECTED_UIDS)
    for name, text in generated.items():
        committed = (DASHBOARDS_DIR / name).read_text()
        assert committed == text, f"{name} is stale: run python grafana/generate.py"


def test_uids_are_stable_and_unique() -> None:
    assert {name: board["uid"] for name, board in DASHBOARDS.items()} == EXPECTED_UIDS
    assert len({board["title"] for board in DASHBOARDS.values()}) == len(DASHBOARDS)


@pytest.mark.parametrize("name", EXPECTED_UIDS)
def test_schema_version_is_current(name: str) -> None:
    assert DASHBOARDS[name]["schemaVersion"] >= CURRENT_SCHEMA_VERSION


@pytest.mark.parametrize("name", EXPECTED_UIDS)
def test_variables(name: str) -> None:
    board = DASHBOARDS[name]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for key in ("job", "instance", "desk"):
        assert variables[key]["type"] == "query"
        assert variables[key]["datasource"] == DATASOURCE
    # the desk variable lists accounts[].labels.desk; the accounts are the chosen desks'
    assert variables["desk"]["query"] == (
        'label_values(binance_pm_account_info{job=~"$job", instance=~"$instance"}, desk)'
    )
    if "account" in variables:
        assert 'desk=~"$desk"' in variables["account"]["query"]
        assert not variables["account"].get("allValue")  # All: the desks' accounts only
    if name == "account.json":
        assert variables["account"]["multi"] is False
        assert variables["asset"]["includeAll"] is True
    for variable in label_values_variables(name, board):
        assert variable.label in {"job", "instance", "desk", "account", "asset"}


@pytest.mark.parametrize("name", EXPECTED_UIDS)
def test_every_panel_has_unit_description_and_datasource(name: str) -> None:
    for panel in panels(DASHBOARDS[name]):
        title = panel.get("title")
        assert title, panel
        assert panel.get("description", "").strip(), f"{name}: {title}: no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{name}: {title}: no unit"
        assert panel["datasource"] == DATASOURCE, f"{name}: {title}"
        assert panel["targets"], f"{name}: {title}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, f"{name}: {title}"
            assert target["expr"].strip()


@pytest.mark.parametrize("name", EXPECTED_UIDS)
def test_panel_ids_unique_and_grid_in_bounds(name: str) -> None:
    ids = []
    for panel in DASHBOARDS[name]["panels"]:
        ids.append(panel["id"])
        ids.extend(inner["id"] for inner in panel.get("panels", []))
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("query", ALL_QUERIES, ids=lambda q: f"{q.dashboard}:{q.panel}:{q.ref_id}")
def test_query_conventions(query: Any) -> None:
    expr = query.expr
    # Range vectors in rate()/increase() use Grafana's $__rate_interval.
    for window in re.findall(r"\[([^\]]*)\]", expr):
        assert window == "$__rate_interval", f"{query}: range [{window}]"
    if re.search(r"\b(rate|irate|increase)\(", expr):
        assert "[$__rate_interval]" in expr
    # Every selector is filtered by the job and instance variables.
    selectors = re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr)
    assert selectors, f"{query}: no selector"
    known = EXPORTER_METRICS | _recording_rules()
    for metric, matchers in selectors:
        assert metric in known, f"{query}: unknown metric {metric}"
        assert 'job=~"$job"' in matchers, f"{query}: {metric} without the job filter"
        assert 'instance=~"$instance"' in matchers, f"{query}: {metric} without instance"
    # No bare metric names outside a selector (they would escape the filters).
    bare = re.sub(r"[a-zA-Z_:][\w:]*\{[^}]*\}", "", expr)
    assert not (set(re.findall(r"binance_pm\w*|\w+:binance_pm\w*:\w+", bare))), query


@pytest.mark.parametrize("name", EXPECTED_UIDS)
def test_used_variables_are_defined(name: str) -> None:
    board = DASHBOARDS[name]
    defined = variable_names(board)
    for query in queries(name, board):
        missing = {v for v in used_variables(query.expr) if not v.startswith("__")} - defined
        assert not missing, f"{query}: undefined {missing}"


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (variables filled) as a recording rule expression."""
    promtool = require("promtool")
    rules = [
        {"record": f"dashboard_query_{i}", "expr": substitute(q.expr, SAMPLE_VALUES)}
        for i, q in enumerate(ALL_QUERIES)
    ]
    rules += [
        {
            "record": f"dashboard_variable_{i}",
            "expr": substitute(v.selector, SAMPLE_VALUES),
        }
        for i, v in enumerate(
            v for name, board in DASHBOARDS.items() for v in label_values_variables(name, board)
        )
    ]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_uni_mmr_thresholds_match_the_alerts() -> None:
    generator = _generator()
    alerts = (ROOT / "prometheus" / "alerts.yml").read_text()
    warning = 'threshold="uni_mmr_warning"}\n'
    critical = 'threshold="uni_mmr_critical"}\n'
    default = "or on (job, instance, account) 0 * binance_pm_uni_mmr + {}"
    assert re.search(
        re.escape(warning) + r"\s*" + re.escape(default.format(generator.UNI_MMR_WARNING)), alerts
    )
    assert re.search(
        re.escape(critical) + r"\s*" + re.escape(default.format(generator.UNI_MMR_CRITICAL)), alerts
    )


def test_the_overview_keeps_to_the_chosen_desks() -> None:
    """Every account series of the overview, totals included, is limited to the accounts
    of the chosen desks (the prices alone have no account)."""
    info = 'and on (job, instance, account) binance_pm_account_info{job=~"$job",'
    for query in queries("overview.json", DASHBOARDS["overview.json"]):
        assert info in query.expr, query
        assert not re.search(r"\b(job|asset):binance_pm", query.expr), query


def test_the_exporter_health_dashboard_shows_the_process() -> None:
    exprs = " ".join(q.expr for q in queries("exporter.json", DASHBOARDS["exporter.json"]))
    for metric in (
        "process_resident_memory_bytes",
        "binance_pm_exporter_memory_limit_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
    ):
        assert f"{metric}{{" in exprs, metric


def test_provisioning() -> None:
    provisioning = ROOT / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    assert datasources["datasources"][0]["isDefault"] is True
    providers = yaml.safe_load((provisioning / "dashboards" / "provider.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()
