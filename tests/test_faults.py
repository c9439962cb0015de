"""The fault matrix: the real exporter against the simulator while the API misbehaves.

Most of it runs on virtual time (exporter/simulator/virtualtime.py): the exporter
in-process on the EventClock, its requests answered by the simulator's own handler
through SimTransport (exporter/simulator/transport.py), with no socket. One scenario runs
every per-account fault at once, each on an account of its own, beside three healthy
accounts; the tests then read what happened (the simulator's request log, the exporter's
snapshots as a recorder saw them, its metrics and log lines). IP-wide faults (429, 418,
403) and the server's clock get exporters of their own.

Every account is refreshed every INTERVAL (a minute) with a 1 s timeout, under the
production backoff cap (300 s). Faults are injected with a count, so each clears itself
after the failures it stands for; recovery comes at the first try after the last
failure. Times are exact, in virtual seconds: the tries follow the backoff (1 interval
after one failure, then 2, 4, ... capped; the cap at once for auth errors), a timeout
fails TIMEOUT after its try, a pause ends at the Retry-After, the server's next minute or
the ban's end, and the server clock's offset is measured to the millisecond.

The rest keeps real sockets, since the sockets are what it tests (marked slow, on the
wall clock, waiting on conditions, timing left to the virtual part): a proxy route that
refuses connections and then listens again, a proxy and a base host that do not resolve,
a base host that refuses and then listens, and a server trickling its answer.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import VIRTUAL_START
from support.faultkit import (
    LogLines,
    Relay,
    RunningExporter,
    Seen,
    VirtualExporter,
    budget_excesses,
    captured_logs,
    gaps,
    hmac_accounts,
    request_times,
    secret_forms,
    weight_by_ip,
)
from support.harness import fast_config
from support.metrics import sample
from support.ports import free_port
from support.waits import wait_until

from exporter.binance import errors
from exporter.binance.client import BinanceClient
from exporter.budget import BOUNDARY_MARGIN_SECONDS
from exporter.config import Config
from exporter.poller import BACKOFF_CAP_SECONDS
from exporter.simulator import RequestRecord, SimAccount, Simulator
from exporter.simulator.virtualtime import EventClock
from exporter.snapshot import AccountSnapshot

INTERVAL = 60.0
TIMEOUT = 1.0
CAP = BACKOFF_CAP_SECONDS  # 300 s: virtual time costs nothing
BUDGET = 100_000  # weight per minute; with share 1 the budget never binds here
#: the matrix's budget: that limit, and a pause only above 90 % of it
FAST = {"ip_weight_limit_per_minute": BUDGET, "ip_high_water": 0.9}
BALANCE = "/papi/v1/balance"
ACCOUNT = "/papi/v1/account"
OLD, NEW = "1.00000000", "2.00000000"  # TESTCOIN's wallet balance before and after
NEW_MMR = "9.99"
SIM_URL = "http://sim.test"  # never resolved: SimTransport answers in-process


def spacing(times: list[float]) -> list[float]:
    """The gaps between `times`, to the microsecond (the float noise of epoch seconds)."""
    return [round(g, 6) for g in gaps(times)]


def virtual_config(entries: list[dict[str, str]]) -> Config:
    return fast_config(SIM_URL, entries, timeout=TIMEOUT, min_interval_seconds=INTERVAL, **FAST)


def virtual_sim(accounts: list[SimAccount], clock: EventClock) -> Simulator:
    """The simulator for SimTransport (never started: no socket), on `clock`, with two
    assets an account besides TESTCOIN: parsing fewer records keeps the matrix quick."""
    return Simulator(accounts, clock=clock, ip_weight_limit=10**7, assets_per_account=2)


def fault(kind: str, *, count: int = 1, endpoint: str = BALANCE, **params: Any) -> dict[str, Any]:
    return {"kind": kind, "count": count, "endpoint": endpoint, **params}


def raw(body: str, endpoint: str = BALANCE) -> dict[str, Any]:
    return fault("raw", body=body, endpoint=endpoint)


@dataclass(frozen=True)
class Case:
    name: str  # the account it runs on, and the test id
    faults: tuple[dict[str, Any], ...]  # inject_fault arguments, matched in this order
    outcome: str  # binance_pm_requests_total{outcome} of its failures
    failures: int = 1
    endpoint: str = BALANCE
    warnings: int = 1  # poll_failed warnings expected: one per change of state


CASES = [
    Case("reset", (fault("reset", count=2),), "connection_error", failures=2),
    Case("read-timeout", (fault("latency", seconds=1.5),), "timeout"),
    Case("headers-then-stall", (fault("stall", seconds=1.5),), "timeout"),
    Case("http-500", (fault("status", status=500),), "server_error"),
    Case("http-502", (fault("status", status=502),), "server_error"),
    Case(
        "http-503-unknown",  # "execution status unknown": for a read, just retry later
        (
            fault(
                "status",
                status=503,
                body='{"code":-1000,"msg":"Unknown error, please check your request or try '
                'again later."}',
            ),
        ),
        "server_error",
    ),
    Case(
        "http-503-unavailable",  # "Service Unavailable.": failed
        (fault("status", status=503, body='{"code":-1008,"msg":"Service Unavailable."}'),),
        "server_error",
    ),
    Case("malformed-json", (fault("malformed_json"),), "invalid_response"),
    Case(
        "object-for-array",
        (raw('{"balances":[{"asset":"USDT","totalWalletBalance":"1.0"}]}'),),
        "invalid_response",
    ),
    Case(
        "numbers-for-strings",
        (raw('[{"asset":"USDT","totalWalletBalance":122607.35,"crossMarginFree":1}]'),),
        "invalid_response",
    ),
    Case(
        "nulls",
        (
            raw(
                '[null,{"asset":null,"crossMarginFree":"1.0"},{"asset":"USDT","umWalletBalance":null}]'
            ),
        ),
        "invalid_response",
    ),
    Case("null-body", (raw("null"),), "invalid_response"),
    Case(
        "missing-fields",
        (raw('[{"totalWalletBalance":"1.0","crossMarginFree":"1.0"}]'),),
        "invalid_response",
    ),
    Case(
        "huge-numbers",
        (
            raw(
                '[{"asset":"USDT","totalWalletBalance":1e400},'
                f'{{"asset":"BTC","totalWalletBalance":"{"9" * 400}"}},'
                f'{{"asset":"ETH","totalWalletBalance":"1.0","updateTime":{"9" * 30}}}]'
            ),
        ),
        "invalid_response",
    ),
    Case(
        "nan",
        (
            raw(
                '[{"asset":"USDT","totalWalletBalance":"NaN"},{"asset":"BTC","crossMarginFree":NaN},'
                '{"asset":"ETH","umWalletBalance":Infinity}]'
            ),
        ),
        "invalid_response",
    ),
    Case(
        "1e400",
        (
            raw(
                '[{"asset":"USDT","totalWalletBalance":"1e400"},{"asset":"BTC","cmWalletBalance":"-1e400"}]'
            ),
        ),
        "invalid_response",
    ),
    Case(
        "account-array", (raw('[{"uniMMR":"5.0"}]', ACCOUNT),), "invalid_response", endpoint=ACCOUNT
    ),
    Case(
        "auth",  # -1022 twice, then -2015: three failures, two changes of state
        (
            fault("api_error", count=2, code=-1022, msg="Signature for this request is not valid."),
            fault(
                "api_error",
                status=401,
                code=-2015,
                msg="Invalid API-key, IP, or permissions for action.",
            ),
        ),
        "auth_error",
        failures=3,
        warnings=2,
    ),
    # 1, 2, 4 intervals, then the cap (not 8 intervals), twice
    Case("backoff", (fault("status", count=5, status=500),), "server_error", failures=5),
]
CONTROLS = ["ok-0", "ok-1", "ok-2"]
PARTIAL = "partial"


def schedule(case: Case) -> list[float]:
    """The gaps between a case's tries, from its first failure to its recovery."""
    if case.outcome == "auth_error":
        return [CAP] * case.failures
    return [min(INTERVAL * 2**n, CAP) for n in range(case.failures)]


# --- the matrix scenario, on virtual time ------------------------------------------------

INJECTED = VIRTUAL_START + 3 * INTERVAL  # every account has been refreshed by then
RESTORED = INJECTED + 2 * INTERVAL  # the partial account's bad record is fixed
#: the slowest case (backoff: 60+120+240+300+300 s from its first try) has recovered,
#: and tried twice more, by then
SETTLED = INJECTED + INTERVAL + sum(schedule(CASES[-1])) + 2 * INTERVAL


@dataclass
class Matrix:
    run: VirtualExporter
    records: list[RequestRecord]
    logs: LogLines
    entries: list[dict[str, str]]
    end_metrics: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def history(self, name: str) -> list[Seen]:
        return self.run.recorder.history(name)


def _episode(history: list[Seen], since: float) -> tuple[Seen, list[Seen], Seen | None]:
    """The last up state before the first failure after `since`, the down states, and the
    first up state after them (None if it never recovered)."""
    start = next(
        i
        for i, s in enumerate(history)
        if s.time >= since and s.snapshot.attempted and not s.snapshot.up
    )
    before = next(s for s in reversed(history[:start]) if s.snapshot.up)
    downs = list(itertools.takewhile(lambda s: not s.snapshot.up, history[start:]))
    rest = history[start + len(downs) :]
    return before, downs, rest[0] if rest else None


def _wallet(snapshot: AccountSnapshot, asset: str = "TESTCOIN") -> float | None:
    found = [b for b in snapshot.balances if b.asset == asset]
    return found[0].values.get("totalWalletBalance") if found else None


@pytest.fixture(scope="module")
def matrix() -> Matrix:
    clock = EventClock(VIRTUAL_START)
    names = [*CONTROLS, *(c.name for c in CASES), PARTIAL]
    sims, entries = hmac_accounts(names)
    sim = virtual_sim(sims, clock)
    for name in names:
        sim.set_asset(name, "TESTCOIN", totalWalletBalance=OLD)
    run = VirtualExporter(virtual_config(entries), sim, clock)

    async def script() -> None:
        await clock.run_until(INJECTED)
        assert run.all_up(), "every account up before the faults"
        for case in CASES:
            for spec in case.faults:
                sim.inject_fault(**spec, account=case.name)
            sim.set_asset(case.name, "TESTCOIN", totalWalletBalance=NEW)
            info = sim.account_info(case.name)
            sim.set_account_info(case.name, {**info, "uniMMR": NEW_MMR})
        records = sim.balances(PARTIAL)
        for record in records:
            if record["asset"] == "TESTCOIN":
                record["totalWalletBalance"] = "NaN"
        sim.set_balances(PARTIAL, [*records, {"asset": "NEWCOIN", "totalWalletBalance": "3.0"}])
        await clock.run_until(RESTORED)
        sim.set_asset(PARTIAL, "TESTCOIN", totalWalletBalance=NEW)
        await clock.run_until(SETTLED)

    with captured_logs() as logs:
        run.run(script)
    matrix = Matrix(run, sim.requests, logs, entries)
    matrix.end_metrics = run.parsed_metrics()
    return matrix


# --- what every fault must do --------------------------------------------------------------


def test_loop_stays_up_and_stops_cleanly(matrix: Matrix) -> None:
    # run() ended: the loop was still polling at SETTLED, then stopped; nothing escaped it
    assert matrix.run.error is None
    assert matrix.run.clock.now() >= SETTLED


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(matrix: Matrix, case: Case) -> None:
    tries = [
        r
        for r in matrix.records
        if r.account == case.name and r.path == case.endpoint and r.time >= INJECTED
    ]
    assert len(tries) > case.failures
    # the first try after the injection met the fault, and the tries followed the backoff
    assert spacing([r.time for r in tries[: case.failures + 1]]) == schedule(case)
    history = matrix.history(case.name)
    before, downs, recovered = _episode(history, INJECTED)

    # binance_pm_up 0 at the first failure, not after retries
    assert downs[0].snapshot.consecutive_failures == 1
    assert downs[0].up_metric == 0.0
    assert len(downs) == case.failures
    # each failure is known when its try ends: at once, or at the timeout
    took = TIMEOUT if case.outcome == "timeout" else 0.0
    assert [d.time for d in downs] == [r.time + took for r in tries[: case.failures]]
    # the last values stay while down, and so does the last success
    for down in downs:
        assert down.snapshot.info == before.snapshot.info
        assert down.snapshot.last_success == before.snapshot.last_success
        if case.endpoint == BALANCE:
            assert down.snapshot.balances == before.snapshot.balances
            assert _wallet(down.snapshot) == float(OLD)
    if case.endpoint == BALANCE:
        (scraped,) = matrix.run.recorder.scrapes[case.name]
        wallet = sample(scraped, "binance_pm_wallet_balance", account=case.name, asset="TESTCOIN")
        assert wallet == float(OLD)

    # recovery at the first try after the last failure, with the new values
    assert recovered is not None
    assert recovered.time == tries[case.failures].time
    assert tries[case.failures].status == 200
    assert recovered.snapshot.up
    assert _wallet(recovered.snapshot) == float(NEW)
    assert recovered.snapshot.info is not None
    assert recovered.snapshot.info.values["uniMMR"] == float(NEW_MMR)
    assert recovered.snapshot.last_success == recovered.time

    # logged once per change of state, then once on recovery
    warned = matrix.logs.events("poll_failed", account=case.name, level="warning")
    assert len(warned) == case.warnings
    assert {e["outcome"] for e in warned} == {case.outcome}
    assert len(matrix.logs.events("poll_recovered", account=case.name)) == 1


def test_every_outcome_is_counted(matrix: Matrix) -> None:
    expected: dict[tuple[str, str], int] = {}
    for case in CASES:
        key = (case.endpoint.rsplit("/", 1)[1], case.outcome)
        expected[key] = expected.get(key, 0) + case.failures
    for (endpoint, outcome), failures in expected.items():
        counted = sample(
            matrix.end_metrics, "binance_pm_requests_total", endpoint=endpoint, outcome=outcome
        )
        assert counted == failures, (endpoint, outcome)


def test_other_accounts_keep_their_schedule(matrix: Matrix) -> None:
    for name in CONTROLS:
        assert all(s.snapshot.up for s in matrix.history(name) if s.snapshot.attempted)
        times = request_times(matrix.records, name)
        # no turn skipped or held back by another account's fault
        assert spacing(times) == [INTERVAL] * (len(times) - 1), name
        assert len(times) == len(request_times(matrix.records, CONTROLS[0]))


def test_backoff_is_exponential_then_capped(matrix: Matrix) -> None:
    tries = [t for t in request_times(matrix.records, "backoff") if t >= INJECTED]
    assert spacing(tries[:6]) == [60.0, 120.0, 240.0, 300.0, 300.0]
    assert spacing(tries[5:8]) == [INTERVAL, INTERVAL]  # recovered: its interval again


def test_auth_errors_go_straight_to_the_cap(matrix: Matrix) -> None:
    tries = [t for t in request_times(matrix.records, "auth") if t >= INJECTED]
    assert spacing(tries[:4]) == [300.0] * 3
    warned = matrix.logs.events("poll_failed", account="auth", level="warning")
    assert ["code -1022" in e["error"] for e in warned] == [True, False]
    assert "code -2015" in warned[1]["error"]
    quiet = matrix.logs.events("poll_failed", account="auth", level="debug")
    assert len(quiet) == 1  # the second -1022: same state, not logged as a warning


def test_one_malformed_record_keeps_that_assets_last_values(matrix: Matrix) -> None:
    history = [s for s in matrix.history(PARTIAL) if s.time >= INJECTED]
    assert all(s.snapshot.up for s in history)
    served_bad = [s for s in history if s.time < RESTORED]
    assert served_bad
    for seen in served_bad:
        assert _wallet(seen.snapshot, "NEWCOIN") == 3.0  # the good records are taken
        assert _wallet(seen.snapshot) == float(OLD)  # kept, not dropped, not NaN
    assert _wallet(history[-1].snapshot) == float(NEW)
    warnings = matrix.logs.events("malformed_records", account=PARTIAL)
    assert len(warnings) == len(served_bad)
    assert all("TESTCOIN" in w["problems"][0] for w in warnings)


def test_budget_holds(matrix: Matrix) -> None:
    assert_budget_held(matrix.records)


def test_weight_spent_matches_what_the_server_saw(matrix: Matrix) -> None:
    # a faulted request is charged too, on both sides: one accounting
    charged = sum(r.weight for r in matrix.records if r.path.startswith("/papi/"))
    assert matrix.run.spent("default") == charged
    assert sum(w for _, w in weight_by_ip(matrix.records)["127.0.0.1"]) == charged
    exposed = sample(matrix.end_metrics, "binance_pm_weight_spent_total", egress="default")
    assert exposed == charged


def test_nothing_secret_is_logged(matrix: Matrix) -> None:
    assert len(matrix.logs.lines) > 50
    assert_no_secret_logged(matrix.logs, matrix.entries)


def assert_no_secret_logged(logs: LogLines, entries: list[dict[str, str]]) -> None:
    text = "\n".join(logs.lines)
    forms = [f for e in entries for f in secret_forms(e["api_key"]) + secret_forms(e["api_secret"])]
    assert sum(form in text for form in forms) == 0  # a count: never print a secret


def assert_budget_held(records: list[RequestRecord]) -> None:
    for ip, weights in weight_by_ip(records).items():
        assert budget_excesses(weights, BUDGET) == [], ip


# --- IP-wide pauses: 429, 418 and 403, on virtual time -------------------------------------

# a, b and c take their turns at START + 0, 20 and 40 s, then every minute
FAULTED_AT = VIRTUAL_START + 70
HIT = VIRTUAL_START + 80  # b's next balance request: the one the fault answers
NEXT_MINUTE = VIRTUAL_START + 110  # VIRTUAL_START is 10 s into a minute
BAN_END = VIRTUAL_START + 150


@pytest.mark.parametrize(
    ("fault_kind", "params", "reason", "resume"),
    [
        # Retry-After, counted from the answer's arrival
        ("rate_limit", {"retry_after": 45}, "rate_limited", HIT + 45),
        # no Retry-After: until the server's next minute, plus the margin
        ("rate_limit", {}, "rate_limited", NEXT_MINUTE + BOUNDARY_MARGIN_SECONDS),
        # until the ban's end in the message, plus the margin
        ("ban", {"until_ms": int(BAN_END * 1000)}, "banned", BAN_END + BOUNDARY_MARGIN_SECONDS),
        # Binance's firewall: an HTML page, about the IP, not the account
        (
            "raw",
            {"status": 403, "body": "<html>403 Forbidden</html>"},
            "waf_blocked",
            NEXT_MINUTE + BOUNDARY_MARGIN_SECONDS,
        ),
    ],
    ids=["429-retry-after", "429-next-minute", "418-ban-end", "403-next-minute"],
)
def test_ip_wide_pause_stops_every_account_until_it_ends(
    clock: EventClock,
    fault_kind: str,
    params: dict[str, Any],
    reason: str,
    resume: float,
) -> None:
    """After the refused request, no account's request reaches the API before the pause
    ends, and the first one comes exactly then."""
    names = ["a", "b", "c"]
    sims, entries = hmac_accounts(names)
    sim = virtual_sim(sims, clock)
    run = VirtualExporter(virtual_config(entries), sim, clock)

    async def script() -> None:
        await clock.run_until(FAULTED_AT)
        assert run.all_up()
        sim.inject_fault(fault_kind, account="b", count=1, endpoint=BALANCE, **params)
        await clock.run_until(VIRTUAL_START + 300)

    with captured_logs() as logs:
        run.run(script)
    metrics = run.parsed_metrics()
    papi = [r for r in sim.requests if r.path.startswith("/papi/")]
    (hit,) = [r for r in papi if r.status in (403, 418, 429)]
    assert hit.account == "b"
    assert hit.time == HIT
    paused = logs.events("requests_paused", reason=reason)
    assert len(paused) == 1
    paused_until = paused[0]["until"]
    assert paused_until == pytest.approx(resume, abs=1e-6)  # float noise only
    # no request from any account until the pause ends; the first one comes then
    after_hit = papi[papi.index(hit) + 1 :]
    assert after_hit[0].time == pytest.approx(paused_until, abs=1e-6)
    assert sample(metrics, "binance_pm_pauses_total", egress="default", reason=reason) == 1.0
    # b showed the failure; the others were held, not failed; all refresh again
    assert any(not s.snapshot.up for s in run.recorder.history("b") if s.time >= hit.time)
    for other in ("a", "c"):
        assert all(s.snapshot.up for s in run.recorder.history(other) if s.snapshot.attempted)
    for name in names:
        assert [t for t in request_times(papi, name) if t >= paused_until]
        assert run.snapshot(name).up
    assert_budget_held(sim.requests)
    assert_no_secret_logged(logs, entries)


# --- the server's clock, on virtual time ---------------------------------------------------


@pytest.mark.parametrize(
    ("offset_ms", "when", "resync"),
    [
        (-3000, "running", True),  # our timestamps 3 s ahead: -1021, resync, success
        (3000, "running", False),  # 3 s behind: still inside recvWindow, nothing to do
        (10_000, "running", True),  # 10 s behind: outside recvWindow, -1021
        (-3000, "at start", False),  # measured by the first time sync: never rejected
    ],
    ids=["3s-behind", "3s-ahead", "10s-ahead", "3s-behind-at-start"],
)
def test_server_clock_offset(clock: EventClock, offset_ms: int, when: str, resync: bool) -> None:
    names = ["a", "b", "c"]
    sims, entries = hmac_accounts(names)
    sim = virtual_sim(sims, clock)
    if when == "at start":
        sim.clock_offset_ms = offset_ms
    run = VirtualExporter(virtual_config(entries), sim, clock)
    changed = VIRTUAL_START + 70  # b's next turn is at START + 80, then c's, then a's

    async def script() -> None:
        await clock.run_until(changed)
        assert run.all_up()
        sim.clock_offset_ms = offset_ms
        await clock.run_until(changed + 2 * INTERVAL)

    with captured_logs() as logs:
        run.run(script)
    offset = run.exporter.pollers[0].client.clock_offset
    metrics = run.parsed_metrics()
    records = sim.requests
    rejected = [i for i, r in enumerate(records) if r.status == 400]
    if resync:
        # the first request after the change is rejected; the resync fixes every later one
        assert [records[i].time for i in rejected] == [changed + 10]
        assert offset == offset_ms / 1000  # no round trip on virtual time: exact
        for i in rejected:  # each -1021 is followed at once by a time sync, then a success
            r = records[i]
            sync = records[i + 1]
            assert (sync.path, sync.time) == ("/fapi/v1/time", r.time)
            retry = next(s for s in records[i + 2 :] if (s.account, s.path) == (r.account, r.path))
            assert retry.status == 200
    else:
        assert rejected == []
        assert offset == (offset_ms / 1000 if when == "at start" else 0.0)
    ok = [r for r in records if r.time > changed and r.status == 200]
    for name in names:
        assert all(s.snapshot.up for s in run.recorder.history(name) if s.snapshot.attempted)
        assert len(request_times(ok, name, ACCOUNT)) == 2  # refreshed every interval
    counted = sum(
        sample(metrics, "binance_pm_requests_total", endpoint=e, outcome="timestamp_error") or 0
        for e in ("balance", "account")
    )
    assert counted == len(rejected)
    assert len(logs.events("timestamp_rejected")) == len(rejected)
    assert_budget_held(records)
    assert_no_secret_logged(logs, entries)


# --- routes and hosts that cannot be reached: real sockets ---------------------------------
# The exporter in a thread on the wall clock; it refreshes every second (the shortest
# interval the config allows), and the tests wait on conditions.

REFUSED, DNS = "refused", "dns"
DNS_PROXY = "http://nonexistent.invalid:3128"


def base_host_config(base_url: str, entries: list[dict[str, str]]) -> Config:
    """The accounts at `base_url`, the price source off: the time sync then has the futures
    host alone, and does not wait for the spot budget's pacing after a price fetch (4 s)
    to try the spot host's time as well."""
    config = fast_config(base_url, entries, timeout=TIMEOUT, **FAST)
    prices = config.prices.model_copy(update={"enabled": False})
    return config.model_copy(update={"prices": prices})


@dataclass
class Routes:
    run: RunningExporter
    records: list[RequestRecord]
    logs: LogLines
    entries: list[dict[str, str]]
    relay_on: float  # when the refused account's route accepted connections again
    relay_egress: str
    end_metrics: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def routes() -> Routes:
    """Three accounts: one on the default route, one through a relay (a proxy) that
    goes off and comes back, one through a proxy whose host does not resolve."""
    names = ["ok", REFUSED, DNS]
    sims, entries = hmac_accounts(names)
    by_name = {e["name"]: e for e in entries}
    with captured_logs() as logs, Simulator(sims, ip_weight_limit=10**7) as sim:
        for name in names:
            sim.set_asset(name, "TESTCOIN", totalWalletBalance=OLD)
        relay = Relay((sim.host, sim.port))
        relay.on()
        by_name[REFUSED]["proxy"] = relay.url
        by_name[DNS]["proxy"] = DNS_PROXY
        config = fast_config(sim.url, entries, timeout=TIMEOUT, **FAST)
        try:
            with RunningExporter(config) as run:
                wait_until(lambda: run.all_up(["ok", REFUSED]), 10, "ok and refused up")
                relay.off()
                sim.set_asset(REFUSED, "TESTCOIN", totalWalletBalance=NEW)
                wait_until(lambda: not run.snapshot(REFUSED).up, 10, "refused down")
                relay.on()
                relay_on = time.time()
                wait_until(lambda: run.snapshot(REFUSED).up, 10, "refused up again")
                wait_until(
                    lambda: run.snapshot(DNS).consecutive_failures >= 2, 10, "dns failed twice"
                )
                assert run.alive, "the exporter's loop died"
                routes = Routes(run, [], logs, entries, relay_on, f"proxy:{relay.url}")
                routes.end_metrics = run.parsed_metrics()
        finally:
            relay.off()
        routes.records = sim.requests
    return routes


@pytest.mark.slow
def test_connection_refused_on_one_route(routes: Routes) -> None:
    history = routes.run.recorder.history(REFUSED)
    before, downs, recovered = _episode(history, 0.0)
    assert downs[0].snapshot.consecutive_failures == 1
    assert downs[0].up_metric == 0.0
    assert all(d.snapshot.balances == before.snapshot.balances for d in downs)
    assert recovered is not None
    assert recovered.time >= routes.relay_on
    # the first request through the route once it listened again brought the recovery
    through = [r for r in routes.records if r.account == REFUSED and r.time >= routes.relay_on]
    assert through[0].status == 200
    assert _wallet(recovered.snapshot) == float(NEW)
    warned = routes.logs.events("poll_failed", account=REFUSED, level="warning")
    assert [e["outcome"] for e in warned] == ["connection_error"]
    # the other routes' accounts went on as they were
    assert all(s.snapshot.up for s in routes.run.recorder.history("ok") if s.snapshot.attempted)


@pytest.mark.slow
def test_an_unresolvable_route_stays_down_harmlessly(routes: Routes) -> None:
    history = routes.run.recorder.history(DNS)
    assert not any(s.snapshot.up for s in history)
    assert history[-1].snapshot.consecutive_failures >= 2
    assert sample(routes.end_metrics, "binance_pm_up", account=DNS) == 0.0
    assert not [r for r in routes.records if r.account == DNS]
    assert routes.run.spent(f"proxy:{DNS_PROXY}") == 0
    warned = routes.logs.events("poll_failed", account=DNS, level="warning")
    assert [e["outcome"] for e in warned] == ["connection_error"]


@pytest.mark.slow
def test_budget_and_weight_per_egress(routes: Routes) -> None:
    spent = weight_by_ip(routes.records)
    assert set(spent) == {"127.0.0.1", Relay.SOURCE_IP}  # the relay's upstream: its egress
    assert_budget_held(routes.records)
    assert routes.run.spent("default") == sum(w for _, w in spent["127.0.0.1"])
    # through the relay, a request cut when it went off was sent but may never have arrived
    assert sum(w for _, w in spent[Relay.SOURCE_IP]) <= routes.run.spent(routes.relay_egress)
    exposed = sample(routes.end_metrics, "binance_pm_weight_spent_total", egress="default")
    assert 0 < (exposed or 0) <= routes.run.spent("default")  # exposed before the last requests
    assert_no_secret_logged(routes.logs, routes.entries)


@pytest.mark.slow
def test_unresolvable_base_host() -> None:
    names = ["a", "b", "c"]
    _, entries = hmac_accounts(names)
    config = base_host_config("http://nonexistent.invalid", entries)
    with captured_logs() as logs, RunningExporter(config) as run:
        wait_until(
            lambda: all(run.snapshot(n).consecutive_failures >= 2 for n in names),
            8,
            "two failures of every account",
        )
        assert run.alive
        metrics = run.parsed_metrics()
    for name in names:
        assert sample(metrics, "binance_pm_up", account=name) == 0.0
        warned = logs.events("poll_failed", account=name, level="warning")
        assert [e["outcome"] for e in warned] == ["connection_error"]
    refused = {"endpoint": "balance", "outcome": "connection_error"}
    assert (sample(metrics, "binance_pm_requests_total", **refused) or 0) >= 6
    assert sample(metrics, "binance_pm_weight_spent_total", egress="default") == 0.0
    assert len(logs.events("time_sync_failed")) == 1
    assert_no_secret_logged(logs, entries)


@pytest.mark.slow
def test_refused_base_host_then_listening() -> None:
    names = ["a", "b", "c"]
    sims, entries = hmac_accounts(names)
    port = free_port()  # nothing listens there yet
    sim = Simulator(sims, port=port, ip_weight_limit=10**6)
    with captured_logs() as logs:
        run = RunningExporter(base_host_config(f"http://127.0.0.1:{port}", entries))
        run.start()
        try:
            wait_until(lambda: all(run.snapshot(n).attempted for n in names), 5, "a failure each")
            assert not any(run.snapshot(n).up for n in names)
            failures = {n: run.snapshot(n).consecutive_failures for n in names}
            sim.start()
            wait_until(run.all_up, 10 * max(failures.values()), "recovery")
            run.settle()
        finally:
            run.close()
            sim.stop()
    for name in names:
        # at most the try already under way failed once the server listened: the next one
        # (after the backoff in force) recovered
        history = run.recorder.history(name)
        assert max(s.snapshot.consecutive_failures for s in history) <= failures[name] + 1
        assert history[-1].snapshot.up
        warned = logs.events("poll_failed", account=name, level="warning")
        assert [e["outcome"] for e in warned] == ["connection_error"]
        assert len(logs.events("poll_recovered", account=name)) == 1
    assert_budget_held(sim.requests)
    assert_no_secret_logged(logs, entries)


# --- a server that trickles its answer: a real socket ---------------------------------------

TRICKLE_TIMEOUT = 0.5


@pytest.mark.slow
def test_a_server_trickling_its_answer_times_out_as_a_whole() -> None:
    """httpx's timeout bounds each read; a byte every 50 ms would hold a request for 50 s."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            while not stop.wait(0.05):  # the fault's pace: a byte every 50 ms, for 50 s
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def call() -> BaseException | None:
        client = BinanceClient(
            base_url=f"http://127.0.0.1:{listener.getsockname()[1]}",
            timeout_seconds=TRICKLE_TIMEOUT,
            recv_window_ms=5000,
        )
        try:
            await client.measure_offset("/fapi/v1/time", "fapi_time")
        except errors.BinanceError as exc:
            return exc
        finally:
            await client.aclose()
        return None

    started = time.monotonic()
    try:
        error = asyncio.run(call())
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert isinstance(error, errors.RequestTimeout)
    # a timeout per read would let the trickle run for 1000 x 50 ms
    assert time.monotonic() - started < 10 * TRICKLE_TIMEOUT
