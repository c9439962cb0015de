"""Write deploy/kubernetes/prometheusrule.yaml from prometheus/alerts.yml.

prometheus/alerts.yml is the one source of the rules; prometheus-operator users
load it as this PrometheusRule. Run after every change of alerts.yml:

    python deploy/kubernetes/generate_prometheusrule.py

tests/test_kubernetes.py fails while the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "prometheus" / "alerts.yml"
TARGET = Path(__file__).resolve().parent / "prometheusrule.yaml"

HEADER = """\
# GENERATED from prometheus/alerts.yml by generate_prometheusrule.py: do not edit.
# Your Prometheus may select rules by a label (kube-prometheus-stack: `release`):
# add it in an overlay.
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as literal blocks, as alerts.yml has them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "binance-pm-exporter",
            "labels": {"app.kubernetes.io/name": "binance-pm-exporter"},
        },
        "spec": {"groups": rules["groups"]},
    }


def render(source: Path = SOURCE) -> str:
    rules = yaml.safe_load(source.read_text())
    body = yaml.dump(
        prometheus_rule(rules), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True
    )
    return HEADER + body


def main() -> int:
    if not SOURCE.exists():
        print(f"{SOURCE}: not found", file=sys.stderr)
        return 1
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
