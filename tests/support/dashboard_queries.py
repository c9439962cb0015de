"""Read the generated Grafana dashboards: their panels, queries and template variables.

Shared by tests/test_dashboards.py (offline checks) and tests/test_e2e_alerting.py
(every query run against a real Prometheus).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"
DASHBOARD_FILES = ("overview.json", "account.json", "exporter.json")

# Grafana's built-in variables, with values fit for a Prometheus scraping every second.
BUILTINS = {
    "__rate_interval": "15s",
    "__interval": "5s",
    "__interval_ms": "5000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$", re.S)


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    ref_id: str
    expr: str
    instant: bool


@dataclass(frozen=True)
class LabelValuesVariable:
    dashboard: str
    name: str
    selector: str
    label: str


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {name: json.loads((DASHBOARDS_DIR / name).read_text()) for name in DASHBOARD_FILES}


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def queries(name: str, dashboard: Mapping[str, Any]) -> list[Query]:
    return [
        Query(
            name,
            panel["title"],
            target["refId"],
            target["expr"],
            bool(target.get("instant")) and not target.get("range"),
        )
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def label_values_variables(name: str, dashboard: Mapping[str, Any]) -> list[LabelValuesVariable]:
    result = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(text.strip())
        assert match, f"{name}: variable {variable['name']}: not label_values(): {text}"
        result.append(
            LabelValuesVariable(
                name, variable["name"], match.group("selector") or "", match.group("label")
            )
        )
    return result


def variable_names(dashboard: Mapping[str, Any]) -> set[str]:
    return {variable["name"] for variable in dashboard.get("templating", {}).get("list", [])}


def used_variables(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(text)}


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Replace $name, ${name}, ${name:format} and [[name]] as Grafana would; KeyError if unknown."""
    merged = {**BUILTINS, **values}

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return merged[name]

    return _VARIABLE.sub(replace, text)
