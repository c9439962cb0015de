"""The simulator against Binance's own documents: every REST answer it can give conforms
to the official PM SDK's models (tests/support/sdkcontract.py says how strictly), every error
body is one the SDK reads, and a corpus of documented payloads (tests/fixtures/binance/,
each naming its source) goes through our parsers and comes back from the simulator.

Break the simulator (rename a field, send a number where the SDK wants a decimal
string) and these fail: `test_a_broken_answer_fails_the_contract` shows it on copies.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import SecretStr
from support import sdkcontract
from support.sdkcontract import ContractError, conform, conform_error, conform_event

from exporter.binance import errors
from exporter.binance.client import _decode
from exporter.binance.events import parse_frame
from exporter.binance.models import parse_account, parse_balances
from exporter.binance.signing import HmacSigner, signed_query
from exporter.collector import SnapshotCollector
from exporter.simulator import SimAccount, Simulator
from exporter.simulator import auth as sim_auth
from exporter.simulator import endpoints as sim_endpoints
from exporter.snapshot import AccountSnapshot, SnapshotStore

FIXTURES = Path(__file__).parent / "fixtures" / "binance"
KEY, SECRET = "contract-key", "contract-secret"
BALANCE, ACCOUNT, LISTEN_KEY = "/papi/v1/balance", "/papi/v1/account", "/papi/v1/listenKey"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def fixtures(kind: str) -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.json") if fixture(p.name)["kind"] == kind)


class Api:
    """Raw requests to the simulator, signed as Binance wants them."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.http = httpx.Client(base_url=sim.url, timeout=5, trust_env=False)

    def signed(self, path: str, **params: str) -> httpx.Response:
        query = [*params.items(), ("timestamp", str(int(time.time() * 1000)))]
        signer = HmacSigner(SecretStr(SECRET))
        return self.http.get(f"{path}?{signed_query(query, signer)}", headers={"X-MBX-APIKEY": KEY})

    def keyed(self, method: str, path: str, key: str = KEY) -> httpx.Response:
        return self.http.request(method, path, headers={"X-MBX-APIKEY": key})


@pytest.fixture
def api() -> Iterator[Api]:
    with Simulator([SimAccount.hmac("a", KEY, SECRET)], assets_per_account=24) as sim:
        client = Api(sim)
        yield client
        client.http.close()


def now_ms() -> int:
    return int(time.time() * 1000)


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()


# ---------------------------------------------------------------- REST answers


def test_balance_without_asset_is_the_sdks_array(api: Api) -> None:
    records = ok(api.signed(BALANCE))
    assert isinstance(records, list)
    assert len(records) == 24
    for index, record in enumerate(records):
        conform(sdkcontract.BALANCE_RECORD, record, complete=True, where=f"$[{index}]")


def test_balance_with_asset_is_the_sdks_object(api: Api) -> None:
    for asset in ("USDT", "BTC"):
        record = ok(api.signed(BALANCE, asset=asset))
        conform(sdkcontract.BALANCE_ONE_ASSET, record, complete=True, where=asset)
        assert "crossMarginAsset" not in record  # documented: this shape lacks it


@pytest.mark.parametrize("status", ["NORMAL", "MARGIN_CALL", "REDUCE_ONLY"])
def test_account_is_the_sdks_object(api: Api, status: str) -> None:
    info = api.sim.account_info("a")
    api.sim.set_account_info("a", {**info, "accountStatus": status})
    conform(sdkcontract.ACCOUNT, ok(api.signed(ACCOUNT)), complete=True)


@pytest.mark.parametrize("book", ["um", "cm"])
def test_the_margin_accounts_are_the_sdks_objects(api: Api, book: str) -> None:
    answer = ok(api.signed(f"/papi/v1/{book}/account"))
    model = sdkcontract.UM_ACCOUNT if book == "um" else sdkcontract.CM_ACCOUNT
    conform(model, answer, complete=True)
    assert answer["positions"]
    assert answer["assets"]
    wrong = {**answer, "positions": [{**answer["positions"][0], "positionAmount": "1"}]}
    with pytest.raises(ContractError):
        conform(model, wrong, complete=True)


def test_listen_key_answers(api: Api) -> None:
    opened = ok(api.keyed("POST", LISTEN_KEY))
    conform(sdkcontract.LISTEN_KEY, opened, complete=True)
    # PUT and DELETE have no model in the SDK (it returns the raw answer): an empty object
    assert ok(api.keyed("PUT", LISTEN_KEY)) == {}
    assert ok(api.keyed("DELETE", LISTEN_KEY)) == {}


@pytest.mark.parametrize("path", ["/fapi/v1/time", "/api/v3/time"])
def test_time_answers(api: Api, path: str) -> None:
    """The documented time endpoints (no PM SDK model: the futures and spot docs')."""
    answer = ok(api.http.get(path))
    assert set(answer) == {"serverTime"}
    assert isinstance(answer["serverTime"], int)


# ---------------------------------------------------------------- error bodies

#: (what to send, the HTTP status and code the simulator answers): every error code the
#: simulator's own code can raise (a test below reads them from its source)
ERRORS: list[tuple[str, Any, int, int]] = [
    ("unknown path", lambda a: a.http.get("/papi/v1/time"), 404, -1020),
    ("wrong method", lambda a: a.http.post("/papi/v1/ping"), 405, -1020),
    ("no api key", lambda a: a.http.get(BALANCE + "?timestamp=1"), 401, -2014),
    ("unknown key", lambda a: a.keyed("POST", LISTEN_KEY, "nobody-has-this-key"), 401, -2015),
    (
        "bad signature",
        lambda a: a.keyed("GET", f"{BALANCE}?timestamp={now_ms()}&signature=00"),
        400,
        -1022,
    ),
    ("no timestamp", lambda a: a.keyed("GET", BALANCE + "?signature=00"), 400, -1102),
    (
        "duplicate",
        lambda a: a.keyed("GET", BALANCE + "?timestamp=1&timestamp=2&signature=0"),
        400,
        -1101,
    ),
    ("old timestamp", lambda a: a.keyed("GET", BALANCE + "?timestamp=1&signature=0"), 400, -1021),
    (
        "recvWindow",
        lambda a: a.keyed("GET", BALANCE + "?recvWindow=70000&timestamp=1&signature=0"),
        400,
        -1131,
    ),
    ("unknown asset", lambda a: a.signed(BALANCE, asset="NOPE"), 400, -1102),
    (
        "no listenKey",
        lambda a: (a.keyed("DELETE", LISTEN_KEY), a.keyed("PUT", LISTEN_KEY))[1],
        400,
        -1125,
    ),
    (
        "symbolStatus",
        lambda a: a.http.get("/api/v3/ticker/price?symbolStatus=ALIVE"),
        400,
        -1100,
    ),
]


@pytest.mark.parametrize(
    ("send", "status", "code"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_every_error_body_is_one_the_sdk_reads(api: Api, send: Any, status: int, code: int) -> None:
    response = send(api)
    assert (response.status_code, response.json().get("code")) == (status, code), response.text
    # binance_common reads code and msg only from an application/json body
    assert response.headers["Content-Type"].startswith("application/json")
    conform_error(response.json())


@pytest.mark.parametrize(
    ("kind", "params", "status"),
    [
        ("rate_limit", {}, 429),
        ("ban", {"until_ms": 4_000_000_000_000}, 418),
        ("status", {"status": 500}, 500),
        ("status", {"status": 503}, 503),
        ("api_error", {"code": -2015, "status": 401, "msg": "Invalid API-key"}, 401),
    ],
)
def test_fault_error_bodies_are_ones_the_sdk_reads(
    api: Api, kind: str, params: dict[str, Any], status: int
) -> None:
    api.sim.inject_fault(kind, count=1, **params)
    response = api.signed(BALANCE)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    conform_error(response.json())


def test_the_error_table_covers_every_code_the_simulator_raises() -> None:
    """Read `ApiError(status, code, ...)` calls from the simulator's source: a new error
    code there needs a row in ERRORS, so its body is checked too."""
    raised = set()
    for module in (sim_auth, sim_endpoints):
        tree = ast.parse(Path(module.__file__ or "").read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "ApiError"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.UnaryOp | ast.Constant)  # a literal code
            ):
                raised.add(ast.literal_eval(node.args[1]))
    assert raised, "no ApiError call found: has the simulator's error type moved?"
    assert raised - {code for *_, code in ERRORS} <= {-1003}  # 429/418: the fault test


# ---------------------------------------------------------------- the corpus


def test_every_fixture_names_its_source() -> None:
    names = sorted(p.name for p in FIXTURES.glob("*.json"))
    assert len(names) >= 10
    for name in names:
        data = fixture(name)
        assert set(data) == {"source", "fixed", "kind", "payload"}, name
        assert data["source"].strip(), name


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_documented_payloads_conform_to_the_sdk(name: str) -> None:
    """The corpus and the SDK agree: neither was written by this project."""
    data = fixture(name)
    payload = data["payload"]
    match data["kind"]:
        case "balance_list":
            for record in payload:
                conform(sdkcontract.BALANCE_RECORD, record, complete=True)
        case "balance_one_asset":
            conform(sdkcontract.BALANCE_ONE_ASSET, payload, complete=True)
        case "account":
            conform(sdkcontract.ACCOUNT, payload, complete=True)
        case "listen_key":
            conform(sdkcontract.LISTEN_KEY, payload, complete=True)
        case "error":
            conform_error(payload)
        case "event":
            conform_event(payload)
        case "frame":
            conform_event(payload["data"])
        case other:
            raise AssertionError(f"{name}: unknown kind {other}")


def test_documented_balances_parse_and_come_back_from_the_simulator(api: Api) -> None:
    documented = fixture("balance_list.json")["payload"]
    parsed = parse_balances(documented)
    assert parsed.problems == ()
    (usdt,) = parsed.balances
    assert usdt.values["crossMarginAsset"] == 103.0
    assert usdt.values["totalWalletBalance"] == pytest.approx(126.72469206)
    assert "cmUnrealizedPNL" not in usdt.values  # "" is no value, not 0
    assert usdt.update_time == 1617939110.373
    # The simulator serves the same state as the documents show it, in both shapes.
    api.sim.set_balances("a", documented)
    assert ok(api.signed(BALANCE)) == documented
    one = fixture("balance_one_asset.json")["payload"]
    assert ok(api.signed(BALANCE, asset="USDT")) == one
    assert parse_balances(one).balances[0].values.keys() == usdt.values.keys() - {
        "crossMarginAsset"
    }


def test_update_time_zero_is_no_time() -> None:
    """PM Pro's docs show updateTime 0: no timestamp sample, never 1970."""
    (record,) = parse_balances(fixture("balance_update_time_zero.json")["payload"]).balances
    assert record.update_time is None
    assert record.values["totalWalletBalance"] == pytest.approx(126.72469206)
    account = fixture("account.json")["payload"]
    assert parse_account({**account, "updateTime": 0}).update_time is None
    assert parse_account(account).update_time == 1657707212.154


def test_update_time_zero_has_no_timestamp_sample_but_the_account_keeps_its_success() -> None:
    """/metrics: no binance_pm_*_update_timestamp_seconds of 0 (an age of 56 years), while
    binance_pm_last_success_timestamp_seconds, which BinancePMDataStale reads, is there."""
    balances = parse_balances(fixture("balance_update_time_zero.json")["payload"]).balances
    info = parse_account({**fixture("account.json")["payload"], "updateTime": 0})
    store = SnapshotStore(
        [AccountSnapshot("desk", 16.0, balances, info, up=True, attempted=True, last_success=5.0)]
    )
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(store))
    text = generate_latest(registry).decode()
    assert "binance_pm_balance_update_timestamp_seconds{" not in text
    assert "binance_pm_account_update_timestamp_seconds{" not in text
    assert 'binance_pm_last_success_timestamp_seconds{account="desk"} 5.0' in text
    assert 'binance_pm_wallet_balance{account="desk",asset="USDT"}' in text


def test_documented_account_parses_and_comes_back_from_the_simulator(api: Api) -> None:
    documented = fixture("account.json")["payload"]
    info = parse_account(documented)
    assert info.status == "NORMAL"
    assert info.values["uniMMR"] == pytest.approx(5167.92171923)
    assert "totalAvailableBalance" not in info.values  # documented as ""
    api.sim.set_account_info("a", documented)
    assert ok(api.signed(ACCOUNT)) == documented


def test_documented_error_maps_to_our_error() -> None:
    body = json.dumps(fixture("error_timestamp.json")["payload"]).encode()
    response = httpx.Response(400, content=body, headers={"Content-Type": "application/json"})
    with pytest.raises(errors.TimestampError) as caught:
        _decode(response, body, None)
    assert caught.value.code == -1021


@pytest.mark.parametrize("name", fixtures("event") + fixtures("frame"))
def test_documented_events_parse(name: str) -> None:
    payload = fixture(name)["payload"]
    event = parse_frame(json.dumps(payload))
    inner = payload.get("data", payload)
    assert event.time_ms == inner["E"]
    assert event.kind == inner["e"]
    if inner["e"] == "listenKeyExpired":
        assert not event.moves_account
    else:
        assert event.moves_account
    if inner["e"] == "riskLevelChange":
        assert event.risk is not None
        assert event.risk.status == "MARGIN_CALL"
        assert event.risk.uni_mmr == pytest.approx(1.99999999)


# ---------------------------------------------------------------- the contract bites


def test_a_broken_answer_fails_the_contract(api: Api) -> None:
    """What the contract catches, on copies of real answers: a renamed field, a dropped
    field, a number where the SDK wants a decimal string, and the reverse."""
    record = ok(api.signed(BALANCE))[0]
    info = ok(api.signed(ACCOUNT))
    renamed = {
        ("crossMarginBorrow" if k == "crossMarginBorrowed" else k): v for k, v in record.items()
    }
    dropped = {k: v for k, v in record.items() if k != "negativeBalance"}
    as_number = {**record, "umWalletBalance": float(record["umWalletBalance"])}
    as_string = {**info, "updateTime": str(info["updateTime"])}
    for model, broken in (
        (sdkcontract.BALANCE_RECORD, renamed),
        (sdkcontract.BALANCE_RECORD, dropped),
        (sdkcontract.BALANCE_RECORD, as_number),
        (sdkcontract.ACCOUNT, as_string),
    ):
        with pytest.raises(ContractError):
            conform(model, broken, complete=True)
    with pytest.raises(ContractError):
        conform_error({"code": "-1021", "msg": "x"})
    with pytest.raises(ContractError):
        conform_event({"e": "riskLevelChange", "E": 1, "u": 1.5})


@pytest.mark.slow
def test_only_the_sdks_models_are_loaded() -> None:
    """The contract imports the SDK's model files, none of its transport (sdkcontract.py)."""
    code = (
        "import sys\nfrom support import sdkcontract\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in"
        " ('aiohttp', 'requests', 'urllib3', 'binance_common', 'Crypto')]\n"
        "assert not loaded, loaded\n"
        "print(len(sdkcontract.EVENT_MODELS))\n"
    )
    tests = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "12"
