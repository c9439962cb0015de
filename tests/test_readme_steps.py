"""The README's "Real use in five steps", run as written from its own code blocks: a
config from examples/minimal.yaml with two environment variables, checked, then run
against the bundled simulator until /metrics shows the account's data.

Step 1 (`python3 -m venv .venv && .venv/bin/pip install .`) is not run: it needs the
package index, and the tests are offline. Its text is checked, and the clone's copy
gets the current virtualenv as its `.venv` instead (the one `./scripts/test` made with
`pip install -e '.[test]'`), so steps 2 to 5 run the installed console script.
Binance's addresses come from the variables examples/minimal.yaml reads, set to the
simulator's; the listen address from BINANCE_PM_EXPORTER_WEB_LISTEN_ADDRESS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
import yaml
from support.waits import wait_until

from exporter.simulator.demo import generate_account
from exporter.simulator.server import Simulator

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MINIMAL = ROOT / "examples" / "minimal.yaml"
INSTALL = "python3 -m venv .venv && .venv/bin/pip install ."


def five_steps() -> list[str]:
    """The shell blocks of the README's "Real use in five steps", in order."""
    text = README.read_text()
    section = text.split("\n## Real use in five steps\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)^ *```", section, flags=re.DOTALL | re.MULTILINE)
    return [textwrap.dedent(block) for block in blocks]


def test_the_readme_has_five_steps_and_the_first_installs_the_clone() -> None:
    steps = five_steps()
    assert len(steps) == 5
    assert steps[0].strip() == INSTALL
    assert "--check-config" in steps[3]


def test_the_first_commands_of_the_readme_are_the_demo_and_the_tests() -> None:
    """The README starts with the two commands: the demo and the test suite, and the
    latter is what CI runs."""
    first = re.search(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert first is not None
    commands = [line.split("#", 1)[0].strip() for line in first.group(1).splitlines()]
    assert commands == ["./scripts/demo", "./scripts/test"]
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ci[-1].strip() in README.read_text()


def test_the_minimal_example_is_one_hmac_account_from_two_variables() -> None:
    data = yaml.safe_load(MINIMAL.read_text())
    (account,) = data["accounts"]
    assert account == {
        "name": "main",
        "api_key": "${BINANCE_API_KEY}",
        "api_secret": "${BINANCE_API_SECRET}",
    }


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """What steps 2 to 5 need of a clone, with the current virtualenv as its .venv."""
    script = Path(sys.prefix) / "bin" / "binance-pm-exporter"
    if sys.prefix == sys.base_prefix or not script.exists():
        pytest.skip("needs a virtualenv with binance-pm-exporter installed (./scripts/test)")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / ".venv").symlink_to(sys.prefix)
    return tmp_path


@pytest.mark.slow
def test_the_five_steps_as_written_get_data_from_the_simulator(clone: Path) -> None:
    steps = five_steps()
    generated = generate_account("main", "hmac")
    key, secret = generated.config["api_key"], generated.config["api_secret"]
    with Simulator([generated.sim_account], "127.0.0.1", 0, assets_per_account=3) as sim:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("BINANCE_")}
        environ |= {
            "BINANCE_PM_BASE_URL": sim.url,
            "BINANCE_PM_STREAM_URL": sim.stream_url,
            "BINANCE_SPOT_BASE_URL": sim.url,
            "BINANCE_PM_EXPORTER_WEB_LISTEN_ADDRESS": "127.0.0.1:0",
        }
        script = "set -euo pipefail\n" + "".join(steps[1:])
        shell = subprocess.Popen(
            ["bash", "-c", script],
            cwd=clone,
            env=environ,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        out: list[str] = []
        err: list[str] = []
        readers = [
            threading.Thread(target=lambda s=s, sink=sink: sink.extend(s), daemon=True)
            for s, sink in ((shell.stdout, out), (shell.stderr, err))
        ]
        for reader in readers:
            reader.start()
        try:
            assert shell.stdin is not None
            shell.stdin.write(f"{key}\n{secret}\n")  # step 2 reads them
            shell.stdin.close()
            line = wait_until(
                lambda: (
                    next((x for x in err if '"listening"' in x), None) or shell.poll() is not None
                ),
                timeout=60,
                what="the exporter of step 5 listening",
            )
            assert line is not True, "the steps stopped:\n" + "".join(out + err)
            port = json.loads(line)["address"].rpartition(":")[2]
            url = f"http://127.0.0.1:{port}/metrics"
            wanted = 'binance_pm_wallet_balance{account="main",asset='
            wait_until(
                lambda: wanted in httpx.get(url, timeout=5).text,
                timeout=60,
                what="the account's balances on /metrics",
            )
            assert 'binance_pm_up{account="main"} 1.0' in httpx.get(url, timeout=5).text
        finally:
            if shell.poll() is None:
                os.killpg(shell.pid, signal.SIGTERM)
            shell.wait(20)
            for reader in readers:
                reader.join(5)
        summary = "".join(out)
        assert sim.url in summary
    assert "accounts (1):" in summary  # step 4's --check-config summary
    assert re.search(r"main\s+hmac", summary)
    assert secret not in summary + "".join(err)
    assert (clone / "config.yaml").read_text() == MINIMAL.read_text()  # step 3


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.DOTALL), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize(
    "document",
    [README, *sorted((ROOT / "docs").glob("*.md"))],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_every_link_of_the_readme_and_docs_reaches_a_file_and_heading(document: Path) -> None:
    """The README's contents and the sections moved to docs/ link to each other: each
    relative link names a file that exists and, with #anchor, a heading of it."""
    text = document.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        assert linked.exists(), f"{document.name}: {target}"
        if anchor:
            assert anchor in anchors(linked.read_text()), f"{document.name}: {target}"
