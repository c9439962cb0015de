"""Write deploy/kubernetes/prometheusrule.yaml from prometheus/alerts.yml.

prometheus/alerts.yml is the one source of the rules; prometheus-operator users
load it as this PrometheusRule. Run after every change of alerts.yml:

    python deploy/kubernetes/generate_prometheusrule.py

tests/test_kubernetes.py fails while the two differ.

Every alert's runbook_url is one base (the runbook's address, DEFAULT_RUNBOOK_BASE:
this project's docs/runbook.md on GitHub) and the alert's anchor. A fork or a private
copy points them at its own runbook with one parameter, for the PrometheusRule and, with
--alerts-out, for a copy of alerts.yml (comments kept) to load with rule_files:

    python deploy/kubernetes/generate_prometheusrule.py \\
        --runbook-base https://git.example.com/ops/binance-pm-exporter/blob/main/docs/runbook.md \\
        --alerts-out /etc/prometheus/rules/binance-pm.yml
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "prometheus" / "alerts.yml"
TARGET = Path(__file__).resolve().parent / "prometheusrule.yaml"
#: where every runbook_url of alerts.yml points (then "#" and the alert's anchor)
DEFAULT_RUNBOOK_BASE = (
    "https://github.com/binance-pm-exporter/binance-pm-exporter/blob/main/docs/runbook.md"
)
_RUNBOOK_URL = re.compile(r"^(\s*runbook_url: )(\S+?)(#[a-z0-9-]+)$", re.MULTILINE)

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


def rebase_runbooks(text: str, base: str = DEFAULT_RUNBOOK_BASE) -> str:
    """An alerts file's text with every runbook_url on `base` (its anchor kept); raises
    ValueError for a runbook_url on another base, which would be left behind."""
    base = base.rstrip("/")

    def rebased(match: re.Match[str]) -> str:
        if match.group(2) != DEFAULT_RUNBOOK_BASE:
            raise ValueError(f"runbook_url not on {DEFAULT_RUNBOOK_BASE}: {match.group(0).strip()}")
        return f"{match.group(1)}{base}{match.group(3)}"

    return _RUNBOOK_URL.sub(rebased, text)


def render(source: Path = SOURCE, runbook_base: str = DEFAULT_RUNBOOK_BASE) -> str:
    rules = yaml.safe_load(rebase_runbooks(source.read_text(), runbook_base))
    body = yaml.dump(
        prometheus_rule(rules), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True
    )
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runbook-base",
        default=DEFAULT_RUNBOOK_BASE,
        help="the runbook's address; each runbook_url is it, '#' and the alert's anchor"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=TARGET,
        help="the PrometheusRule to write (default: %(default)s)",
    )
    parser.add_argument(
        "--alerts-out",
        type=Path,
        default=None,
        help="also write alerts.yml with the runbook base, for rule_files: (default: none)",
    )
    args = parser.parse_args(argv)
    if not SOURCE.exists():
        print(f"{SOURCE}: not found", file=sys.stderr)
        return 1
    args.out.write_text(render(SOURCE, args.runbook_base))
    print(f"wrote {args.out}")
    if args.alerts_out is not None:
        args.alerts_out.write_text(rebase_runbooks(SOURCE.read_text(), args.runbook_base))
        print(f"wrote {args.alerts_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
