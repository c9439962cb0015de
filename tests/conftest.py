from collections.abc import Iterator
from pathlib import Path

import pytest
from support.harness import RunningExporter, accounts, fast_config

from exporter.logs import configure_logging
from exporter.simulator import Simulator
from exporter.simulator.demo import GeneratedAccount
from exporter.simulator.virtualtime import EventClock

#: where virtual time starts: 10 s into a minute, so a minute boundary is not at hand
VIRTUAL_START = 1_699_999_990.0


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    """Before every test: warnings only, to stderr as it is now. A test that runs the CLI
    in-process configures logging to pytest's capture of stderr, which closes after it."""
    configure_logging("warning", "json")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite golden files from current output"
    )


#: the marks of long tests, longest first: a file goes where its longest test puts it
LONG = ("e2e", "slow", "attack")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long files first (a real Prometheus, then whole processes), each file's tests kept
    together and in order: with a file to a worker (./scripts/test: --dist loadfile
    --no-loadscope-reorder) a long file handed out last ran alone at the end, as
    test_e2e_alerting.py did for 25 s."""
    rank: dict[Path, int] = {}
    for item in items:
        here = min((LONG.index(m.name) for m in item.iter_markers() if m.name in LONG), default=3)
        rank[item.path] = min(rank.get(item.path, here), here)
    items.sort(key=lambda item: rank[item.path])


@pytest.fixture
def clock() -> EventClock:
    """The virtual clock (exporter.clock.Clock): it moves only when every task waits."""
    return EventClock(VIRTUAL_START)


@pytest.fixture
def generated() -> list[GeneratedAccount]:
    """Three accounts, one of each key type: HMAC, Ed25519, RSA."""
    return accounts(3, ("hmac", "ed25519", "rsa"))


@pytest.fixture
def sim(generated: list[GeneratedAccount]) -> Iterator[Simulator]:
    """The simulator over loopback HTTP, serving `generated`, with room for every refresh."""
    with Simulator([g.sim_account for g in generated], ip_weight_limit=60000) as simulator:
        yield simulator


@pytest.fixture
def exporter(sim: Simulator, generated: list[GeneratedAccount]) -> Iterator[RunningExporter]:
    """The real exporter polling `sim` every second, serving HTTP on a free loopback port."""
    with RunningExporter(fast_config(sim.url, generated)) as running:
        yield running
