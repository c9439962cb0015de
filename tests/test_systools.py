"""A test that needs a program ./scripts/test installs with apt fails without it (CI must
never skip it), and skips, saying why, with SKIP_APT=1."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.systools import require


@pytest.fixture
def no_programs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))


@pytest.mark.usefixtures("no_programs")
def test_a_missing_program_fails_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SKIP_APT", raising=False)
    with pytest.raises(pytest.fail.Exception) as failure:
        require("promtool")
    assert "install Debian's prometheus package" in str(failure.value)


@pytest.mark.usefixtures("no_programs")
def test_with_skip_apt_a_missing_program_skips_the_test_saying_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SKIP_APT", "1")
    with pytest.raises(pytest.skip.Exception) as skip:
        require("prometheus-alertmanager")
    assert str(skip.value) == (
        "prometheus-alertmanager not installed: SKIP_APT=1 skips the tests that need "
        "Debian's prometheus-alertmanager package"
    )


def test_a_program_on_path_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    program = tmp_path / "promtool"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SKIP_APT", "1")
    assert require("promtool") == str(program)
