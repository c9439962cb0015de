"""Each account's requests go by its own route: its proxy, its credentials, its source address.

Two real HTTP proxies on loopback (tests/support/proxies.py: absolute-URI forwarding, as httpx
proxies http:// origins) record, for every request, the address it came from and the credentials it
carried, and connect on from an exit address picked by the username, as proxy services
that choose the exit IP by credentials do. The simulator behind them counts weight per
client IP, as Binance does. Accounts on one route share one client and one budget.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from support.faultkit import captured_logs, secret_forms
from support.harness import RunningExporter, sim_config
from support.proxies import RecordingProxy, Seen, running
from support.waits import wait_until

from exporter.binance import errors
from exporter.binance.client import BinanceClient
from exporter.cli import main
from exporter.route import Route
from exporter.simulator import Simulator
from exporter.simulator.demo import GeneratedAccount, exporter_config, generate_account

PASSWORDS = {
    "user-alice-0001": "pw-alice-s3cr3t-1111",
    "user-bob-000002": "pw-bob-s3cr3t-22222",
    "user-carol-0003": "pw-carol-s3cr3t-333",
}


@dataclass(frozen=True)
class Expected:
    """How an account's requests should travel."""

    proxy: int | None  # index into the proxies
    user: str | None
    source: str | None  # the account's source_address
    #: the address the proxy sees the account's requests come from
    client_ip: str
    #: the address the simulator (Binance) sees them come from
    exit_ip: str


EXPECTED = {
    # two accounts on one route: one client, one budget
    "alice-1": Expected(0, "user-alice-0001", None, "127.0.0.1", "127.0.0.4"),
    "alice-2": Expected(0, "user-alice-0001", None, "127.0.0.1", "127.0.0.4"),
    # the same proxy with other credentials: another exit, another route
    "bob": Expected(0, "user-bob-000002", None, "127.0.0.1", "127.0.0.5"),
    # another proxy; then the same proxy and credentials reached from a source address
    "carol": Expected(1, "user-carol-0003", None, "127.0.0.1", "127.0.0.6"),
    "carol-src": Expected(1, "user-carol-0003", "127.0.0.2", "127.0.0.2", "127.0.0.6"),
    # a source address alone, and the default route
    "src": Expected(None, None, "127.0.0.3", "127.0.0.3", "127.0.0.3"),
    "direct": Expected(None, None, None, "127.0.0.1", "127.0.0.1"),
}


def make_proxies() -> list[RecordingProxy]:
    exits = {"user-alice-0001": "127.0.0.4", "user-bob-000002": "127.0.0.5"}
    first = RecordingProxy({user: (PASSWORDS[user], ip) for user, ip in exits.items()})
    second = RecordingProxy({"user-carol-0003": (PASSWORDS["user-carol-0003"], "127.0.0.6")})
    return [first, second]


def route_settings(proxies: list[RecordingProxy]) -> dict[str, dict[str, Any]]:
    """The `proxy` and `source_address` keys of each account."""
    settings: dict[str, dict[str, Any]] = {}
    for name, expected in EXPECTED.items():
        keys: dict[str, Any] = {}
        if expected.proxy is not None:
            assert expected.user is not None
            keys["proxy"] = proxies[expected.proxy].url(expected.user)
        if expected.source is not None:
            keys["source_address"] = expected.source
        settings[name] = keys
    return settings


def route_of(name: str, proxies: list[RecordingProxy]) -> Route:
    keys = route_settings(proxies)[name]
    return Route(keys.get("proxy"), keys.get("source_address"))


def leaked(text: str) -> list[str]:
    """The proxy credentials, in any form they could leak, found in `text`."""
    forms = [form for secret in PASSWORDS.values() for form in secret_forms(secret)]
    forms += list(PASSWORDS)  # a username may be a secret too (an API token as the user)
    return [form for form in forms if form in text]


@dataclass
class Run:
    sim: Simulator
    proxies: list[RecordingProxy]
    generated: dict[str, GeneratedAccount]
    exporter: RunningExporter
    metrics: str
    logs: list[str]


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    generated = {name: generate_account(name, "hmac") for name in EXPECTED}
    proxies = make_proxies()
    with (
        running(*proxies),
        Simulator([g.sim_account for g in generated.values()], "127.0.0.1") as sim,
        captured_logs() as logs,
    ):
        config = sim_config(
            sim.url,
            list(generated.values()),
            {"share": 1.0, "min_interval_seconds": 1},
            extra=route_settings(proxies),
        )
        with RunningExporter(config) as exporter:
            store = exporter.exporter.store
            wait_until(
                lambda: all(a.up for a in store.current.accounts.values()),
                what="every account refreshed",
            )
            exporter.stop_polling()  # from here on, nothing moves
            yield Run(sim, proxies, generated, exporter, exporter.metrics_text(), logs.lines)


@pytest.mark.slow
def test_each_account_travels_by_its_own_route(run: Run) -> None:
    key_of = {g.config["api_key"]: name for name, g in run.generated.items()}
    for index, proxy in enumerate(run.proxies):
        for seen in proxy.seen:
            if seen.api_key is None:
                continue  # the time sync of a route: checked below
            expected = EXPECTED[key_of[seen.api_key]]
            assert expected.proxy == index, key_of[seen.api_key]
            assert (seen.client_ip, seen.user) == (expected.client_ip, expected.user)
            assert seen.password == PASSWORDS[expected.user]
    by_account = defaultdict(set)
    for record in run.sim.requests:
        if record.account is not None:
            by_account[record.account].add(record.client_ip)
    assert by_account == {name: {e.exit_ip} for name, e in EXPECTED.items()}
    proxied = {key_of[seen.api_key] for proxy in run.proxies for seen in proxy.seen if seen.api_key}
    assert proxied == {name for name, e in EXPECTED.items() if e.proxy is not None}
    # each proxied route synced its clock through its proxy, with its own credentials
    syncs = {
        (index, seen.client_ip, seen.user)
        for index, proxy in enumerate(run.proxies)
        for seen in proxy.seen
        if seen.api_key is None
    }
    expected_syncs = {
        (e.proxy, e.client_ip, e.user) for e in EXPECTED.values() if e.proxy is not None
    }
    assert syncs == expected_syncs


def test_one_budget_per_route_and_the_weight_it_counts_is_its_ips(run: Run) -> None:
    routes = {name: route_of(name, run.proxies) for name in EXPECTED}
    labels = {route.label for route in routes.values()}
    assert len(labels) == len(set(routes.values())) == 6  # alice-1 and alice-2 share one
    budgets = {b.egress: b for b in run.exporter.exporter.budgets}
    assert set(budgets) == labels
    # the weight each route's budget counted is what Binance charged its exit IP
    # (on the PM pool: the price ticker's weight is the spot API's and the server time's
    # the futures API's, each budgeted apart)
    charged: dict[str, int] = defaultdict(int)
    for record in run.sim.requests:
        if record.path.startswith("/papi/"):
            charged[record.client_ip] += record.weight
    # the server time was read through every route, from the documented futures endpoint
    timed = {r.client_ip for r in run.sim.requests if r.path == "/fapi/v1/time"}
    assert timed == {expected.exit_ip for expected in EXPECTED.values()}
    spent: dict[str, int] = defaultdict(int)
    for name, route in routes.items():
        if name != "alice-2":
            spent[EXPECTED[name].exit_ip] += budgets[route.label].spent_total
    assert spent == charged
    for label in labels:
        assert f'binance_pm_weight_spent_total{{egress="{label}"}}' in run.metrics


def test_the_egress_label_shows_no_credentials(run: Run) -> None:
    labels = [b.egress for b in run.exporter.exporter.budgets]
    port = run.proxies[0].port
    alice, bob = route_of("alice-1", run.proxies), route_of("bob", run.proxies)
    assert alice.label.startswith(f"proxy:http://127.0.0.1:{port}#")
    assert bob.label.startswith(f"proxy:http://127.0.0.1:{port}#")
    assert alice.label != bob.label
    assert route_of("carol-src", run.proxies).label.startswith("source:127.0.0.2,proxy:")
    assert leaked(" ".join(labels)) == []
    assert leaked(repr([route_of(name, run.proxies) for name in EXPECTED])) == []


def test_no_proxy_credential_in_metrics_or_logs(run: Run) -> None:
    assert leaked(run.metrics) == []
    assert any('"polling_started"' in line for line in run.logs)
    assert leaked("\n".join(run.logs)) == []


def test_no_proxy_credential_in_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proxies = make_proxies()
    proxies[0].port, proxies[1].port = 3128, 3129
    generated = [generate_account(name, "hmac") for name in EXPECTED]
    data = exporter_config("http://127.0.0.1:1", generated)
    settings = route_settings(proxies)
    environ = {}
    for account in data["accounts"]:
        keys = settings[account["name"]]
        if "proxy" in keys:  # the password from the environment, as config.example.yaml does
            variable = f"PROXY_PASSWORD_{len(environ)}"
            environ[variable] = urlsplit(keys["proxy"]).password
            keys = {**keys, "proxy": keys["proxy"].replace(environ[variable], f"${{{variable}}}")}
        account.update(keys)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["--config.file", str(path), "--check-config"], environ) == 0
    out, err = capsys.readouterr()
    assert "egress=source:127.0.0.2,proxy:http://127.0.0.1:3129#" in out
    assert leaked(out + err) == []


def test_a_route_is_a_value() -> None:
    route = Route("http://u:pw@proxy.internal:3128", "10.0.0.2")
    assert Route("HTTP://u:pw@Proxy.Internal:3128/", "10.0.0.2") == route
    assert len({route, Route("http://u:pw@proxy.internal:3128", "10.0.0.2")}) == 1
    others = [
        Route("http://u:other@proxy.internal:3128", "10.0.0.2"),  # another password
        Route("http://v:pw@proxy.internal:3128", "10.0.0.2"),  # another user
        Route("http://u:pw@proxy.internal:3128"),  # no source address
        Route("http://u:pw@proxy.internal:3129", "10.0.0.2"),
        Route(source_address="10.0.0.2"),
        Route(),
    ]
    labels = [route.label, *(other.label for other in others)]
    assert len(set(labels)) == len(labels)
    assert all("pw" not in label and "other" not in label for label in labels)
    assert repr(route) == f"Route({route.label})"
    assert Route().label == "default"


def test_a_tunnel_to_an_https_origin_leaves_from_the_source_address_too() -> None:
    # Binance is https://: httpx opens a CONNECT tunnel, another path through httpcore.
    proxy = RecordingProxy({"user-alice-0001": (PASSWORDS["user-alice-0001"], "127.0.0.4")})

    async def sync_time() -> None:
        client = BinanceClient(
            base_url="https://papi.binance.test",
            timeout_seconds=5,
            recv_window_ms=5000,
            route=Route(proxy.url("user-alice-0001"), "127.0.0.2"),
        )
        with pytest.raises(errors.ConnectionFailed) as caught:
            # the server time, from the futures host: through the accounts' route too
            await client.measure_offset("https://fapi.binance.test/fapi/v1/time", "fapi_time")
        await client.aclose()
        assert leaked(str(caught.value)) == []

    with running(proxy):
        asyncio.run(sync_time())
    password = PASSWORDS["user-alice-0001"]
    assert proxy.seen == [Seen("127.0.0.2", "user-alice-0001", password, None, "CONNECT")]


def test_a_client_takes_a_route_or_a_transport_never_both() -> None:
    with pytest.raises(ValueError, match="exclusive"):
        BinanceClient(
            base_url="http://127.0.0.1:1",
            timeout_seconds=1,
            recv_window_ms=5000,
            transport=httpx.MockTransport(lambda request: httpx.Response(200)),
            route=Route(source_address="127.0.0.2"),
        )
