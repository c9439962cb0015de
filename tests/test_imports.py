"""The shape of the house, as import rules: data flows one way, and leaves stay leaves.

Each rule reads the source with `ast`, following `exporter` imports transitively, so an
import added anywhere down a chain breaks the rule it breaks, with the chain's module named.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "exporter"


def imported_modules(path: Path) -> set[str]:
    """Absolute module names `path` imports (relative imports resolved within exporter/)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            modules.add(base)
            # `from exporter import fields` imports the module exporter.fields
            modules.update(f"{base}.{alias.name}" for alias in node.names)
    return modules


def module_path(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "exporter":
        return None
    candidate = ROOT.joinpath(*parts)
    for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
        if path.is_file():
            return path
    return None


def closure(module: str) -> dict[str, set[str]]:
    """`module` and every exporter module it reaches, each with the modules it imports."""
    graph: dict[str, set[str]] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_path(name)
        if name in graph or path is None:
            continue
        graph[name] = imported_modules(path)
        todo.extend(graph[name])
    return graph


def package_modules(package: str) -> list[str]:
    folder = ROOT.joinpath(*package.split("."))
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in folder.glob("*.py")
    )


def reached(module: str) -> set[str]:
    """Every module name imported anywhere in `module`'s exporter closure."""
    return set().union(*closure(module).values())


#: (modules, module prefixes none of them may reach, why)
FORBIDDEN = [
    (
        package_modules("exporter.config"),
        ("exporter.budget", "exporter.binance", "exporter.poller", "httpx"),
        "config is plain data: the wiring turns settings into running parts",
    ),
    (
        ["exporter.collector", "exporter.exposition", "exporter.snapshot", "exporter.families"],
        # the collector modules the families come from hold their parsers too (pure
        # functions of exporter.binance.models), never a client, a stream or a transport
        (
            "exporter.binance.client",
            "exporter.binance.stream",
            "exporter.binance.transport",
            "exporter.poller",
            "httpx",
            "websockets",
        ),
        "the scrape path never talks to Binance",
    ),
    (
        [m for m in package_modules("exporter.collectors") if m != "exporter.collectors"],
        ("exporter.poller", "exporter.server", "exporter.http", "exporter.app", "exporter.cli"),
        "a collector declares an endpoint: the poller and the scrape path read it",
    ),
    (
        package_modules("exporter.binance"),
        ("exporter.poller", "exporter.budget", "exporter.app", "exporter.cli", "exporter.http"),
        "the client knows nothing of scheduling or serving",
    ),
    (
        package_modules("exporter.http"),
        (
            "exporter.poller",
            # the families' collector modules hold their parsers (exporter.binance.models,
            # pure functions), never a client, a stream or a transport
            "exporter.binance.client",
            "exporter.binance.stream",
            "exporter.binance.transport",
            "exporter.binance.signing",
            "exporter.config",
            "exporter.webconfig",
            "exporter.storage",
            "exporter.app",
            "exporter.serve",
            "exporter.cli",
            "httpx",
        ),
        "HTTP serves what it is given: it loads no config and polls nothing",
    ),
]


@pytest.mark.parametrize(
    ("module", "prefixes"),
    [(module, prefixes) for modules, prefixes, _ in FORBIDDEN for module in modules],
    ids=[module for modules, _, _ in FORBIDDEN for module in modules],
)
def test_no_import_runs_back_up(module: str, prefixes: tuple[str, ...]) -> None:
    bad = sorted(name for name in reached(module) if name.startswith(prefixes))
    assert not bad, f"{module} reaches {bad}"


def exporter_modules() -> list[str]:
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py")
    )


@pytest.mark.parametrize(
    "module", [m for m in exporter_modules() if not m.startswith("exporter.http")]
)
def test_the_rest_imports_only_the_public_face_of_http(module: str) -> None:
    path = module_path(module)
    assert path is not None
    inner = sorted(
        name
        for name in imported_modules(path)
        if name.startswith("exporter.http.") and module_path(name) is not None
    )
    assert not inner, f"{module} imports {inner}: import them from exporter.http"


#: small modules every part reads: the standard library only (and each other)
LEAVES = [
    "exporter.fields",
    "exporter.weights",
    "exporter.route",
    "exporter.budget",
    "exporter.safefile",
]


@pytest.mark.parametrize("module", LEAVES)
def test_leaves_import_only_the_standard_library(module: str) -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    bad = sorted(
        name for name in reached(module) if name.split(".")[0] not in allowed and name not in LEAVES
    )
    assert not bad, f"{module} imports {bad}"


#: the collector modules: each registers one endpoint
COLLECTOR_MODULES = ["balance", "account", "um_account", "cm_account"]


@pytest.mark.parametrize("name", COLLECTOR_MODULES)
def test_a_collector_imports_no_other_collector(name: str) -> None:
    others = {f"exporter.collectors.{other}" for other in COLLECTOR_MODULES if other != name}
    reaches = reached(f"exporter.collectors.{name}")
    bad = sorted(m for m in reaches if m in others or m.startswith(tuple(o + "." for o in others)))
    assert not bad, f"exporter.collectors.{name} reaches {bad}"
    assert "exporter.collectors" not in reaches  # the package imports every collector


def test_every_collector_module_is_listed() -> None:
    helpers = {
        "exporter.collectors",
        "exporter.collectors.registry",
        "exporter.collectors.margin",  # what UM and CM share
        "exporter.collectors.stored",  # the checks of a saved part
    }
    listed = {f"exporter.collectors.{name}" for name in COLLECTOR_MODULES}
    assert set(package_modules("exporter.collectors")) == listed | helpers


@pytest.mark.parametrize("module", package_modules("exporter.simulator"))
def test_the_simulator_imports_nothing_of_the_exporter(module: str) -> None:
    bad = sorted(
        name
        for name in reached(module)
        if name.startswith("exporter") and not name.startswith("exporter.simulator")
        # `from exporter.simulator import x` names the package `exporter.simulator`
    )
    assert not bad, f"{module} reaches {bad}: the demo's exporter side is exporter/demo.py"


#: metrics and polling: the self-metrics read figures the budget and the poller hand them
#: (plain values, a small protocol), so none of these reaches back to another
METRICS_AND_POLLING = ("exporter.selfmetrics", "exporter.budget", "exporter.poller")


@pytest.mark.parametrize(
    ("first", "second"),
    [(a, b) for i, a in enumerate(METRICS_AND_POLLING) for b in METRICS_AND_POLLING[i + 1 :]],
)
def test_metrics_and_polling_import_each_other_in_no_loop(first: str, second: str) -> None:
    assert not (second in reached(first) and first in reached(second)), (first, second)


def test_the_self_metrics_import_neither_budget_nor_poller() -> None:
    reaches = reached("exporter.selfmetrics")
    assert not reaches & {"exporter.budget", "exporter.poller"}, reaches


@pytest.mark.slow
def test_no_import_cycles() -> None:
    graph = closure("exporter.cli")
    for simulator in package_modules("exporter.simulator"):
        graph.update(closure(simulator))
    # A module importing its own package (`exporter.config.loader` -> `exporter.config`)
    # reaches only the package's __init__, which re-exports it: not a cycle.
    edges = {
        name: {m for m in imports if m in graph and m != name and not name.startswith(m + ".")}
        for name, imports in graph.items()
    }
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)
