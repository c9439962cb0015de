"""The programs ./scripts/test installs system-wide with apt: `promtool` and `prometheus`
(Debian's prometheus package), `prometheus-alertmanager` and its `amtool`. A test that
needs one and does not find it fails, as CI must never skip them, unless the suite runs with
SKIP_APT=1 (./scripts/test without apt): then it skips, saying what is missing and why."""

from __future__ import annotations

import os
import shutil

import pytest

PACKAGE = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "amtool": "prometheus-alertmanager",
}


def require(program: str) -> str:
    """The path of `program`; else a skip with SKIP_APT=1, a failure without."""
    path = shutil.which(program)
    if path is not None:
        return path
    package = PACKAGE[program]
    if os.environ.get("SKIP_APT") == "1":
        pytest.skip(
            f"{program} not installed: SKIP_APT=1 skips the tests that need "
            f"Debian's {package} package"
        )
    pytest.fail(
        f"{program} not on PATH: install Debian's {package} package (./scripts/test does; "
        "SKIP_APT=1 skips the tests that need it)"
    )
