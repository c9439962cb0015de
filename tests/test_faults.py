"""The fault matrix: the real exporter against the simulator while the API misbehaves.

One scenario runs every per-account fault at once, each on an account of its own, beside
three healthy accounts; the tests then read what happened (the simulator's request log,
the exporter's snapshots as a recorder saw them, its metrics and log lines). IP-wide
faults (429, 418), the server's clock, and unreachable hosts get exporters of their own.

Every account is refreshed each second (INTERVAL) with a 1 s timeout, and the backoff
cap is shortened from 300 s to 1.5 s (CAP) for the matrix. Faults are injected with a
count, so each clears itself after the failures it stands for; recovery is asserted
at the first try after the last failure. The tries' spacing follows the backoff (1
interval after one failure, then 2, 4, ... capped; CAP at once for auth errors): never
early, late by less than LATE however loaded the machine. The exact schedule is
asserted on virtual time in test_poller.py.
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
from support.faultkit import (
    LogLines,
    Relay,
    RunningExporter,
    Seen,
    budget_excesses,
    captured_logs,
    gaps,
    hmac_accounts,
    request_times,
    secret_forms,
    weight_by_ip,
)
from support.harness import fast_config
from support.metrics import parse_metrics, sample
from support.ports import free_port
from support.waits import wait_until

from exporter.binance import errors
from exporter.binance.client import BinanceClient
from exporter.clock import SystemClock
from exporter.simulator import RequestRecord, Simulator
from exporter.snapshot import AccountSnapshot

pytestmark = pytest.mark.slow

INTERVAL = 1.0
TIMEOUT = 1.0
CAP = 1.5
BUDGET = 100_000  # weight per minute; with share 1 the budget never binds here
#: the matrix's budget: that limit, and a pause only above 90 % of it
FAST = {"ip_weight_limit_per_minute": BUDGET, "ip_high_water": 0.9}
EARLY = 0.2  # a gap between two arrivals may look shorter by the first request's transit
LATE = 1.0  # how late a loaded machine may run a try: less than a backoff step
BALANCE = "/papi/v1/balance"
ACCOUNT = "/papi/v1/account"
OLD, NEW = "1.00000000", "2.00000000"  # TESTCOIN's wallet balance before and after
NEW_MMR = "9.99"


def assert_spaced(times: list[float], expected: list[float]) -> None:
    """Consecutive `times` are `expected` apart: never early, and late by less than LATE,
    which still tells one backoff step (or the cap) from the next."""
    actual = gaps(times)
    assert len(actual) >= len(expected), (actual, expected)
    for got, want in zip(actual, expected, strict=False):
        assert want - EARLY <= got <= want + LATE, (actual, expected)


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
    Case("reset", (fault("reset"),), "connection_error"),
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
    Case("backoff", (fault("status", count=3, status=500),), "server_error", failures=3),
]
CONTROLS = ["ok-0", "ok-1", "ok-2"]
REFUSED, DNS, PARTIAL = "refused", "dns", "partial"


# --- the matrix scenario -----------------------------------------------------------------


@dataclass
class Matrix:
    run: RunningExporter
    records: list[RequestRecord]
    logs: LogLines
    entries: list[dict[str, str]]
    injected: float  # when the faults went in
    relay_on: float  # when the refused account's route accepted connections again
    restored: float  # when the partial account's bad record was fixed
    relay_egress: str
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


def _recovered(history: list[Seen], since: float) -> bool:
    down = False
    for s in history:
        if s.time < since:
            continue
        if not s.snapshot.up:
            down = True
        elif down and s.snapshot.consecutive_failures == 0:
            return True
    return False


def _wallet(snapshot: AccountSnapshot, asset: str = "TESTCOIN") -> float | None:
    found = [b for b in snapshot.balances if b.asset == asset]
    return found[0].values.get("totalWalletBalance") if found else None


@pytest.fixture(scope="module")
def matrix() -> Matrix:
    names = [*CONTROLS, *(c.name for c in CASES), REFUSED, DNS, PARTIAL]
    sims, entries = hmac_accounts(names)
    by_name = {e["name"]: e for e in entries}
    with captured_logs() as logs, Simulator(sims, ip_weight_limit=10**7) as sim:
        for name in names:
            sim.set_asset(name, "TESTCOIN", totalWalletBalance=OLD)
        relay = Relay((sim.host, sim.port))
        relay.on()
        by_name[REFUSED]["proxy"] = relay.url
        by_name[DNS]["proxy"] = "http://nonexistent.invalid:3128"
        config = fast_config(sim.url, entries, timeout=TIMEOUT, **FAST)
        run = RunningExporter(config, backoff_cap=CAP)
        try:
            with run:
                matrix = _drive(sim, run, relay, logs, entries)
                matrix.end_metrics = run.parsed_metrics()
        finally:
            relay.off()
        matrix.records = sim.requests
    return matrix


def _drive(
    sim: Simulator,
    run: RunningExporter,
    relay: Relay,
    logs: LogLines,
    entries: list[dict[str, str]],
) -> Matrix:
    ready = [e["name"] for e in entries if e["name"] != DNS]
    wait_until(lambda: run.all_up(ready), 10, "every account (but dns) to be up")
    injected = time.time()
    for case in CASES:
        for spec in case.faults:
            sim.inject_fault(**spec, account=case.name)
    relay.off()
    for case in CASES:
        sim.set_asset(case.name, "TESTCOIN", totalWalletBalance=NEW)
        info = sim.account_info(case.name)
        sim.set_account_info(case.name, {**info, "uniMMR": NEW_MMR})
    sim.set_asset(REFUSED, "TESTCOIN", totalWalletBalance=NEW)
    records = sim.balances(PARTIAL)
    for record in records:
        if record["asset"] == "TESTCOIN":
            record["totalWalletBalance"] = "NaN"
    sim.set_balances(PARTIAL, [*records, {"asset": "NEWCOIN", "totalWalletBalance": "3.0"}])

    relay_on = restored = 0.0
    deadline = time.monotonic() + 60
    while True:
        assert run.alive, "the exporter's loop died"
        now = time.time()
        if not relay_on and not run.snapshot(REFUSED).up:
            relay.on()
            relay_on = time.time()
        if not restored and _wallet(run.snapshot(PARTIAL), "NEWCOIN") is not None:
            sim.set_asset(PARTIAL, "TESTCOIN", totalWalletBalance=NEW)
            restored = time.time()
        pending = [c.name for c in CASES if not _recovered(run.recorder.history(c.name), injected)]
        pending += [] if now - injected > 2.0 else ["latency"]  # its handler has logged
        pending += (
            [] if relay_on and _recovered(run.recorder.history(REFUSED), injected) else [REFUSED]
        )
        pending += [] if restored and _wallet(run.snapshot(PARTIAL)) == float(NEW) else [PARTIAL]
        if not pending:
            break
        assert time.monotonic() < deadline, f"the matrix did not settle within 60 s: {pending}"
        time.sleep(0.02)
    egress = f"proxy:{relay.url}"
    return Matrix(run, [], logs, entries, injected, relay_on, restored, egress)


# --- what every fault must do --------------------------------------------------------------


def test_loop_stays_up_and_stops_cleanly(matrix: Matrix) -> None:
    assert matrix.run.error is None  # close() has joined the loop; nothing escaped it


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(matrix: Matrix, case: Case) -> None:
    tries = sorted(
        (
            r
            for r in matrix.records
            if r.account == case.name and r.path == case.endpoint and r.time >= matrix.injected
        ),
        key=lambda r: r.time,
    )
    assert len(tries) > case.failures
    history = matrix.history(case.name)
    before, downs, recovered = _episode(history, matrix.injected)

    # binance_pm_up 0 at the first failure, not after retries
    assert downs[0].snapshot.consecutive_failures == 1
    assert downs[0].up_metric == 0.0
    assert len(downs) == case.failures
    # the last values stay while down, and so does the last success
    for down in downs:
        assert down.snapshot.info == before.snapshot.info
        assert down.snapshot.last_success == before.snapshot.last_success
        if case.endpoint == BALANCE:
            assert down.snapshot.balances == before.snapshot.balances
            assert _wallet(down.snapshot) == float(OLD)
    if case.endpoint == BALANCE:
        scraped = parse_metrics(matrix.run.recorder.scrapes[case.name][0])
        wallet = sample(scraped, "binance_pm_wallet_balance", account=case.name, asset="TESTCOIN")
        assert wallet == float(OLD)

    # recovery at the first try after the last failure, with the new values
    assert recovered is not None
    assert recovered.time >= tries[case.failures].time
    assert tries[case.failures].status == 200
    assert recovered.snapshot.up
    assert _wallet(recovered.snapshot) == float(NEW)
    assert recovered.snapshot.info is not None
    assert recovered.snapshot.info.values["uniMMR"] == float(NEW_MMR)
    assert recovered.snapshot.last_success is not None
    assert recovered.snapshot.last_success > before.snapshot.last_success  # type: ignore[operator]

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
        assert counted is not None
        assert counted >= failures, (endpoint, outcome)


def test_other_accounts_keep_their_schedule(matrix: Matrix) -> None:
    for name in CONTROLS:
        assert all(s.snapshot.up for s in matrix.history(name) if s.snapshot.attempted)
        times = request_times(matrix.records, name)
        assert len(times) >= 5
        intervals = gaps(times)
        # no turn skipped or held back by another account's fault (that would be 2 s or more)
        assert max(intervals) < 2 * INTERVAL, (name, intervals)


def test_backoff_is_exponential_then_capped(matrix: Matrix) -> None:
    tries = [t for t in request_times(matrix.records, "backoff") if t >= matrix.injected]
    assert_spaced(tries[:4], [INTERVAL, min(2 * INTERVAL, CAP), CAP])


def test_auth_errors_go_straight_to_the_cap(matrix: Matrix) -> None:
    tries = [t for t in request_times(matrix.records, "auth") if t >= matrix.injected]
    assert_spaced(tries[:4], [CAP] * 3)
    warned = matrix.logs.events("poll_failed", account="auth", level="warning")
    assert ["code -1022" in e["error"] for e in warned] == [True, False]
    assert "code -2015" in warned[1]["error"]
    quiet = matrix.logs.events("poll_failed", account="auth", level="debug")
    assert len(quiet) == 1  # the second -1022: same state, not logged as a warning


def test_connection_refused_on_one_route(matrix: Matrix) -> None:
    history = matrix.history(REFUSED)
    before, downs, recovered = _episode(history, matrix.injected)
    assert downs[0].snapshot.consecutive_failures == 1
    assert downs[0].up_metric == 0.0
    assert all(d.snapshot.balances == before.snapshot.balances for d in downs)
    assert recovered is not None
    assert recovered.time >= matrix.relay_on
    # the first request through the route once it listened again brought the recovery
    through = [r for r in matrix.records if r.account == REFUSED and r.time >= matrix.relay_on]
    assert through[0].status == 200
    assert _wallet(recovered.snapshot) == float(NEW)
    warned = matrix.logs.events("poll_failed", account=REFUSED, level="warning")
    assert [e["outcome"] for e in warned] == ["connection_error"]


def test_an_unresolvable_route_stays_down_harmlessly(matrix: Matrix) -> None:
    history = matrix.history(DNS)
    assert not any(s.snapshot.up for s in history)
    assert history[-1].snapshot.consecutive_failures >= 3
    failed_at = [s.time for s in history if s.snapshot.attempted]
    assert_spaced(failed_at[:3], [INTERVAL, CAP])  # backoff, capped
    assert sample(matrix.end_metrics, "binance_pm_up", account=DNS) == 0.0
    assert not [r for r in matrix.records if r.account == DNS]
    assert matrix.run.spent("proxy:http://nonexistent.invalid:3128") == 0
    warned = matrix.logs.events("poll_failed", account=DNS, level="warning")
    assert [e["outcome"] for e in warned] == ["connection_error"]


def test_one_malformed_record_keeps_that_assets_last_values(matrix: Matrix) -> None:
    history = [s for s in matrix.history(PARTIAL) if s.time >= matrix.injected]
    assert all(s.snapshot.up for s in history)
    served_bad = next(s for s in history if _wallet(s.snapshot, "NEWCOIN") is not None)
    assert _wallet(served_bad.snapshot) == float(OLD)  # kept, not dropped, not NaN
    assert _wallet(history[-1].snapshot) == float(NEW)
    (warning,) = matrix.logs.events("malformed_records", account=PARTIAL)[:1]
    assert "TESTCOIN" in warning["problems"][0]


def test_budget_holds_for_each_egress(matrix: Matrix) -> None:
    spent = weight_by_ip(matrix.records)
    assert set(spent) == {"127.0.0.1", Relay.SOURCE_IP}
    for ip, weights in spent.items():
        assert budget_excesses(weights, BUDGET) == [], ip


def test_weight_spent_matches_what_the_server_saw(matrix: Matrix) -> None:
    spent = weight_by_ip(matrix.records)
    assert matrix.run.spent("default") == sum(w for _, w in spent["127.0.0.1"])
    # through the relay, a request cut when it went off was sent but may never have arrived
    assert sum(w for _, w in spent[Relay.SOURCE_IP]) <= matrix.run.spent(matrix.relay_egress)
    exposed = sample(matrix.end_metrics, "binance_pm_weight_spent_total", egress="default")
    assert 0 < (exposed or 0) <= matrix.run.spent("default")  # exposed before the last requests


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


# --- IP-wide pauses: 429 and 418 -----------------------------------------------------------


class ShiftedClock(SystemClock):
    """Wall time plus a shift, shared by the simulator and the exporter."""

    def __init__(self) -> None:
        self.shift = 0.0

    def now(self) -> float:
        return time.time() + self.shift

    def __call__(self) -> float:  # the simulator's clock
        return self.now()


@pytest.mark.parametrize(
    ("fault_kind", "params", "reason"),
    [
        ("rate_limit", {"retry_after": 1}, "rate_limited"),
        ("rate_limit", {}, "rate_limited"),  # until the next minute boundary
        ("ban", {}, "banned"),  # until the ban's end in the message
        # Binance's firewall: an HTML page, about the IP, not the account
        ("raw", {"status": 403, "body": "<html>403 Forbidden</html>"}, "waf_blocked"),
    ],
    ids=["429-retry-after", "429-next-minute", "418-ban-end", "403-next-minute"],
)
def test_ip_wide_pause_stops_every_account_until_it_ends(
    fault_kind: str, params: dict[str, Any], reason: str
) -> None:
    names = ["a", "b", "c"]
    sims, entries = hmac_accounts(names)
    clock = ShiftedClock()
    with (
        captured_logs() as logs,
        Simulator(sims, ip_weight_limit=10**6, clock=clock) as sim,
    ):
        with RunningExporter(
            fast_config(sim.url, entries, timeout=TIMEOUT, **FAST), clock=clock
        ) as run:
            wait_until(run.all_up, 5, "every account up")
            if reason in ("rate_limited", "waf_blocked") and "retry_after" not in params:
                clock.shift += (58.0 - clock() % 60) % 60  # jump to 2 s before a minute's end
            if fault_kind == "ban":
                params = {"until_ms": int(clock() * 1000) + 1500}
            injected = clock()
            sim.inject_fault(fault_kind, account="b", count=1, endpoint=BALANCE, **params)
            hit = wait_until(
                lambda: [r for r in sim.requests if r.status in (403, 418, 429)], 3, "the fault"
            )[0]
            budget = run.exporter.budgets[0]
            wait_until(lambda: budget.pause_reason == reason, 3, "the pause")
            seen = clock()
            paused_until = budget.paused_until

            def resumed() -> bool:
                after = [r for r in sim.requests if r.time >= paused_until]
                return run.all_up() and all(request_times(after, n) for n in names)

            wait_until(resumed, 10, "every account to refresh after the pause")
            metrics = run.parsed_metrics()
        records = sim.requests
    assert hit.account == "b"
    assert hit.time >= injected
    if "retry_after" in params:  # counted from the answer's arrival
        retry_after = params["retry_after"]
        assert hit.time + retry_after <= paused_until <= seen + retry_after
    else:  # the server's minute or ban end, on our estimate of its clock (off by RTT/2)
        server_end = params["until_ms"] / 1000 if fault_kind == "ban" else (hit.time // 60 + 1) * 60
        assert paused_until == pytest.approx(server_end + 0.5, abs=0.5)
    # no request from any account until the pause ends, but those already on their way
    # when the answer came (one per other account at most)
    after_hit = records[records.index(hit) + 1 :]
    early = [r for r in after_hit if r.time < paused_until]
    assert len(early) <= len(names) - 1, early
    assert "b" not in {r.account for r in early}
    assert sample(metrics, "binance_pm_pauses_total", egress="default", reason=reason) == 1.0
    # b showed the failure; the others were held, not failed; all refresh again
    history = run.recorder.history("b")
    assert any(not s.snapshot.up for s in history if s.time >= injected)
    for other in ("a", "c"):
        assert all(s.snapshot.up for s in run.recorder.history(other) if s.snapshot.attempted)
    for name in names:
        assert [t for t in request_times(records, name) if t >= paused_until]
    paused = logs.events("requests_paused", reason=reason)
    assert len(paused) == 1
    assert paused[0]["until"] == pytest.approx(paused_until, abs=0.001)
    assert run.error is None
    assert_budget_held(records)
    assert_no_secret_logged(logs, entries)


# --- the server's clock --------------------------------------------------------------------


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
def test_server_clock_offset(offset_ms: int, when: str, resync: bool) -> None:
    names = ["a", "b", "c"]
    sims, entries = hmac_accounts(names)
    with captured_logs() as logs, Simulator(sims, ip_weight_limit=10**6) as sim:
        if when == "at start":
            sim.clock_offset_ms = offset_ms
        with RunningExporter(fast_config(sim.url, entries, timeout=TIMEOUT, **FAST)) as run:
            wait_until(run.all_up, 5, "every account up")
            changed = time.time()
            sim.clock_offset_ms = offset_ms

            def refreshed() -> bool:
                ok = [r for r in sim.requests if r.time > changed and r.status == 200]
                return all(request_times(ok, n, ACCOUNT) for n in names)

            wait_until(refreshed, 5, "another refresh of every account")
            offset = run.exporter.pollers[0].client.clock_offset
            metrics = run.parsed_metrics()
        records = sim.requests
    rejected = [r for r in records if r.status == 400]
    if resync:
        assert rejected
        assert offset == pytest.approx(offset_ms / 1000, abs=0.5)  # off by RTT/2 at most
        for r in rejected:  # each -1021 is followed by a time sync, then a success
            after = [s for s in records if s.time > r.time]
            retry = next(s for s in after if s.account == r.account and s.path == r.path)
            assert retry.status == 200
            assert any(s.path == "/fapi/v1/time" and s.time <= retry.time for s in after)
    else:
        assert rejected == []
        expected = offset_ms / 1000 if when == "at start" else 0.0
        assert offset == pytest.approx(expected, abs=0.5)
    for name in names:
        assert all(s.snapshot.up for s in run.recorder.history(name) if s.snapshot.attempted)
    counted = sum(
        sample(metrics, "binance_pm_requests_total", endpoint=e, outcome="timestamp_error") or 0
        for e in ("balance", "account")
    )
    assert counted == len(rejected)
    assert len(logs.events("timestamp_rejected")) == len(rejected)
    assert run.error is None
    assert_budget_held(records)
    assert_no_secret_logged(logs, entries)


# --- hosts that cannot be reached ----------------------------------------------------------


def test_unresolvable_base_host() -> None:
    names = ["a", "b", "c"]
    _, entries = hmac_accounts(names)
    config = fast_config("http://nonexistent.invalid", entries, timeout=TIMEOUT, **FAST)
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
        failed_at = [s.time for s in run.recorder.history(name) if s.snapshot.attempted]
        assert gaps(failed_at[:2]) == pytest.approx([INTERVAL], abs=0.3)
        warned = logs.events("poll_failed", account=name, level="warning")
        assert [e["outcome"] for e in warned] == ["connection_error"]
    refused = {"endpoint": "balance", "outcome": "connection_error"}
    assert (sample(metrics, "binance_pm_requests_total", **refused) or 0) >= 6
    assert sample(metrics, "binance_pm_weight_spent_total", egress="default") == 0.0
    assert len(logs.events("time_sync_failed")) == 1
    assert_no_secret_logged(logs, entries)


def test_refused_base_host_then_listening() -> None:
    names = ["a", "b", "c"]
    sims, entries = hmac_accounts(names)
    port = free_port()  # nothing listens there yet
    sim = Simulator(sims, port=port, ip_weight_limit=10**6)
    with captured_logs() as logs:
        run = RunningExporter(
            fast_config(f"http://127.0.0.1:{port}", entries, timeout=TIMEOUT, **FAST)
        )
        run.start()
        try:
            wait_until(lambda: all(run.snapshot(n).attempted for n in names), 5, "a failure each")
            assert not any(run.snapshot(n).up for n in names)
            failures = {n: run.snapshot(n).consecutive_failures for n in names}
            sim.start()
            wait_until(run.all_up, 10 * INTERVAL * max(failures.values()), "recovery")
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


# --- a server that trickles its answer ------------------------------------------------------


def test_a_server_trickling_its_answer_times_out_as_a_whole() -> None:
    """httpx's timeout bounds each read; a byte every 0.2 s would hold a request forever."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            while not stop.wait(0.2):
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def call() -> BaseException | None:
        client = BinanceClient(
            base_url=f"http://127.0.0.1:{listener.getsockname()[1]}",
            timeout_seconds=TIMEOUT,
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
    # a timeout per read would let the trickle run for 1000 x 0.2 s
    assert time.monotonic() - started < 10 * TIMEOUT
