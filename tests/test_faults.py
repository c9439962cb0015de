"""The fault matrix: the real exporter against the simulator while the API misbehaves.

One scenario runs every per-account fault at once, each on an account of its own, beside
three healthy accounts; the tests then read what happened (the simulator's request log,
the exporter's snapshots as a recorder saw them, its metrics and log lines). IP-wide
faults (429, 418), the server's clock, and unreachable hosts get exporters of their own.

Every account is refreshed each second (INTERVAL) with a 1 s timeout, and the backoff
cap is shortened from 300 s to 1.5 s (CAP) for the matrix. Faults are injected with a
count, so each clears itself after the failures it stands for; recovery is asserted
within the backoff in force after the last failure (1 interval after one failure,
then 2, 4, ... capped; CAP at once for auth errors).
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
from faultkit import (
    LogLines,
    Relay,
    RunningExporter,
    Seen,
    budget_excesses,
    captured_logs,
    fast_config,
    free_port,
    gaps,
    hmac_accounts,
    parse_metrics,
    request_times,
    sample,
    secret_forms,
    wait_until,
    weight_by_ip,
)

from exporter.binance import errors
from exporter.binance.client import BinanceClient
from exporter.simulator import RequestRecord, Simulator
from exporter.snapshot import AccountSnapshot

INTERVAL = 1.0
TIMEOUT = 1.0
CAP = 1.5
BUDGET = 100_000  # weight per minute; with share 1 the budget never binds here
SLACK = 0.5  # seconds of scheduling leeway on a loaded 2-core machine
BALANCE = "/papi/v1/balance"
ACCOUNT = "/papi/v1/account"
OLD, NEW = "1.00000000", "2.00000000"  # TESTCOIN's wallet balance before and after
NEW_MMR = "9.99"


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

    @property
    def backoff_in_force(self) -> float:
        """Seconds from the last failure's refresh to the next try."""
        if self.outcome == "auth_error":
            return CAP
        return min(INTERVAL * 2 ** (self.failures - 1), CAP)


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
    refused_failures: int  # its failures by then
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
        config = fast_config(sim.url, entries, limit=BUDGET, timeout=TIMEOUT)
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
    refused_failures = 0
    deadline = time.monotonic() + 20
    while True:
        assert run.alive, "the exporter's loop died"
        now = time.time()
        if not relay_on and not run.snapshot(REFUSED).up:
            relay.on()
            relay_on, refused_failures = time.time(), run.snapshot(REFUSED).consecutive_failures
        if not restored and _wallet(run.snapshot(PARTIAL), "NEWCOIN") is not None:
            sim.set_asset(PARTIAL, "TESTCOIN", totalWalletBalance=NEW)
            restored = time.time()
        done = (
            now - injected > 2.0  # the latency fault's handler has finished and logged
            and all(_recovered(run.recorder.history(c.name), injected) for c in CASES)
            and relay_on
            and _recovered(run.recorder.history(REFUSED), injected)
            and restored
            and _wallet(run.snapshot(PARTIAL)) == float(NEW)
        )
        if done:
            break
        assert time.monotonic() < deadline, "the matrix did not settle within 20 s"
        time.sleep(0.02)
    egress = f"proxy:{relay.url}"
    return Matrix(run, [], logs, entries, injected, relay_on, refused_failures, restored, egress)


# --- what every fault must do --------------------------------------------------------------


def test_loop_stays_up_and_stops_cleanly(matrix: Matrix) -> None:
    assert matrix.run.error is None  # close() has joined the loop; nothing escaped it


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(matrix: Matrix, case: Case) -> None:
    failing = [r.time for r in matrix.records if r.account == case.name and r.path == case.endpoint]
    failing = [t for t in failing if t >= matrix.injected][: case.failures]
    assert len(failing) == case.failures
    history = matrix.history(case.name)
    before, downs, recovered = _episode(history, matrix.injected)

    # binance_pm_up 0 within one refresh: as soon as the failing request has failed
    assert downs[0].time - failing[0] <= TIMEOUT + SLACK
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

    # recovery within the backoff in force after the last failure, with the new values
    assert recovered is not None
    assert recovered.time - failing[-1] <= case.backoff_in_force + SLACK
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
        assert max(intervals) <= INTERVAL + SLACK, (name, intervals)
        assert sum(intervals) / len(intervals) == pytest.approx(INTERVAL, abs=0.05)


def test_backoff_is_exponential_then_capped(matrix: Matrix) -> None:
    tries = [t for t in request_times(matrix.records, "backoff") if t >= matrix.injected]
    assert gaps(tries[:4]) == pytest.approx([INTERVAL, min(2 * INTERVAL, CAP), CAP], abs=0.2)


def test_auth_errors_go_straight_to_the_cap(matrix: Matrix) -> None:
    tries = [t for t in request_times(matrix.records, "auth") if t >= matrix.injected]
    assert gaps(tries[:4]) == pytest.approx([CAP] * 3, abs=0.2)
    warned = matrix.logs.events("poll_failed", account="auth", level="warning")
    assert ["code -1022" in e["error"] for e in warned] == [True, False]
    assert "code -2015" in warned[1]["error"]
    quiet = matrix.logs.events("poll_failed", account="auth", level="debug")
    assert len(quiet) == 1  # the second -1022: same state, not logged as a warning


def test_connection_refused_on_one_route(matrix: Matrix) -> None:
    history = matrix.history(REFUSED)
    before, downs, recovered = _episode(history, matrix.injected)
    assert downs[0].time - matrix.injected <= INTERVAL + SLACK
    assert downs[0].up_metric == 0.0
    assert all(d.snapshot.balances == before.snapshot.balances for d in downs)
    assert recovered is not None
    backoff = min(INTERVAL * 2 ** (matrix.refused_failures - 1), CAP)
    assert recovered.time - matrix.relay_on <= backoff + SLACK
    assert _wallet(recovered.snapshot) == float(NEW)
    warned = matrix.logs.events("poll_failed", account=REFUSED, level="warning")
    assert [e["outcome"] for e in warned] == ["connection_error"]


def test_an_unresolvable_route_stays_down_harmlessly(matrix: Matrix) -> None:
    history = matrix.history(DNS)
    assert not any(s.snapshot.up for s in history)
    assert history[-1].snapshot.consecutive_failures >= 3
    failed_at = [s.time for s in history if s.snapshot.attempted]
    assert gaps(failed_at[:3]) == pytest.approx([INTERVAL, CAP], abs=0.3)  # backoff, capped
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


class ShiftedClock:
    """Wall time plus a shift, shared by the simulator and the exporter."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


@pytest.mark.parametrize(
    ("fault_kind", "params", "reason"),
    [
        ("rate_limit", {"retry_after": 1}, "rate_limited"),
        ("rate_limit", {}, "rate_limited"),  # until the next minute boundary
        ("ban", {}, "banned"),  # until the ban's end in the message
    ],
    ids=["429-retry-after", "429-next-minute", "418-ban-end"],
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
        with RunningExporter(fast_config(sim.url, entries, limit=BUDGET), clock=clock) as run:
            wait_until(run.all_up, 5, "every account up")
            if not params and fault_kind == "rate_limit":
                clock.shift += (58.0 - clock() % 60) % 60  # jump to 2 s before a minute's end
            if fault_kind == "ban":
                params = {"until_ms": int(clock() * 1000) + 1500}
            injected = clock()
            sim.inject_fault(fault_kind, account="b", count=1, endpoint=BALANCE, **params)
            hit = wait_until(
                lambda: [r for r in sim.requests if r.status in (418, 429)], 3, "the fault"
            )[0]
            if "retry_after" in params:
                end = hit.time + params["retry_after"]
            elif fault_kind == "ban":
                end = params["until_ms"] / 1000 + 0.5
            else:
                end = (hit.time // 60 + 1) * 60 + 0.5

            def resumed() -> bool:
                after = [r for r in sim.requests if r.time > end]
                return run.all_up() and all(request_times(after, n) for n in names)

            wait_until(resumed, 10, "every account to refresh after the pause")
            metrics = run.parsed_metrics()
            paused_until = run.exporter.budgets[0].paused_until
        records = sim.requests
    assert hit.account == "b"
    assert hit.time >= injected
    assert paused_until == pytest.approx(end, abs=0.1)
    # zero requests from any account until the pause ends (a request already on its way
    # when the 429 arrived may land just after it)
    assert [r for r in records if hit.time + 0.05 < r.time < end - 0.05] == []
    first_after = min(r.time for r in records if r.time > hit.time + 0.05)
    assert end - 0.05 <= first_after <= end + SLACK
    assert sample(metrics, "binance_pm_pauses_total", egress="default", reason=reason) == 1.0
    # b showed the failure; the others were held, not failed; all refresh again
    history = run.recorder.history("b")
    assert any(not s.snapshot.up for s in history if s.time >= injected)
    for other in ("a", "c"):
        assert all(s.snapshot.up for s in run.recorder.history(other) if s.snapshot.attempted)
    for name in names:
        assert [t for t in request_times(records, name) if t > end]
    paused = logs.events("requests_paused", reason=reason)
    assert len(paused) == 1
    assert paused[0]["until"] == pytest.approx(end, abs=0.1)
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
        with RunningExporter(fast_config(sim.url, entries, limit=BUDGET)) as run:
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
        assert offset == pytest.approx(offset_ms / 1000, abs=0.1)
        for r in rejected:  # each -1021 is followed by a time sync, then a success
            after = [s for s in records if s.time > r.time]
            assert after[0].path == "/papi/v1/time"
            assert after[0].time - r.time < SLACK
            retry = next(s for s in after if s.account == r.account and s.path == r.path)
            assert retry.status == 200
    else:
        assert rejected == []
        expected = offset_ms / 1000 if when == "at start" else 0.0
        assert offset == pytest.approx(expected, abs=0.1)
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
    config = fast_config("http://nonexistent.invalid", entries, limit=BUDGET)
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
        run = RunningExporter(fast_config(f"http://127.0.0.1:{port}", entries, limit=BUDGET))
        run.start()
        try:
            wait_until(lambda: all(run.snapshot(n).attempted for n in names), 5, "a failure each")
            assert not any(run.snapshot(n).up for n in names)
            sim.start()
            listening = time.time()
            failures = {n: run.snapshot(n).consecutive_failures for n in names}
            wait_until(run.all_up, 4 * INTERVAL * max(failures.values()), "recovery")
            run.settle()
        finally:
            run.close()
            sim.stop()
    for name in names:
        up = next(s for s in run.recorder.history(name) if s.snapshot.up)
        in_force = INTERVAL * 2 ** (failures[name] - 1)
        assert up.time - listening <= in_force + SLACK
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
            await client.sync_time()
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
    assert time.monotonic() - started < TIMEOUT + SLACK
