from collections.abc import Iterator

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
