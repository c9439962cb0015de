import pytest

from exporter.logs import configure_logging


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    """Before every test: warnings only, to stderr as it is now. A test that runs the CLI
    in-process configures logging to pytest's capture of stderr, which closes after it."""
    configure_logging("warning", "json")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite golden files from current output"
    )
