"""Every event the simulator can push conforms to the official PM SDK's event models, and
the SDKs' combined stream form reaches the exporter like the documented one.

Parametrised over the builder functions of `exporter.simulator.events` (found by
introspection, not listed by hand): a builder added there is called here with the
scenarios of `SCENARIOS`, or with arguments picked by parameter name from `ARGUMENTS`;
a builder neither covers fails `test_every_builder_is_covered` until it is. Builders of
deliberate misbehaviour are in `OFF_CONTRACT`, and must really fail the contract.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import wait_until
from sdkcontract import ContractError, conform_event
from websockets.sync.client import ClientConnection, connect

from exporter.binance.events import parse_frame
from exporter.selfmetrics import StreamHealth
from exporter.simulator import SimAccount, Simulator
from exporter.simulator import events as builders
from exporter.streams import _AccountObserver
from exporter.triggers import Priority

NOW = 1_800_000_000_000
RECORD = {
    "asset": "BTC",
    "totalWalletBalance": "1.50000000",
    "crossMarginAsset": "1.00000000",
    "crossMarginBorrowed": "0.00000000",
    "crossMarginFree": "0.90000000",
    "crossMarginInterest": "0.00000000",
    "crossMarginLocked": "0.10000000",
    "umWalletBalance": "0.30000000",
    "umUnrealizedPNL": "0.01000000",
    "cmWalletBalance": "0.20000000",
    "cmUnrealizedPNL": "",
    "updateTime": NOW - 1000,
    "negativeBalance": "0",
}
ACCOUNT = {
    "uniMMR": "5.00000000",
    "accountEquity": "1000.00000000",
    "actualEquity": "1010.00000000",
    "accountInitialMargin": "100.00000000",
    "accountMaintMargin": "50.00000000",
    "accountStatus": "NORMAL",
    "virtualMaxWithdrawAmount": "900.00000000",
    "totalAvailableBalance": "900.00000000",
    "totalMarginOpenLoss": "0.00000000",
    "updateTime": NOW - 1000,
}


def changed(**fields: str) -> list[dict[str, Any]]:
    return [{**RECORD, **fields}]


#: builder name -> keyword arguments of each call; together they make every event type
SCENARIOS: dict[str, list[dict[str, Any]]] = {
    "balance_events": [
        # cross margin moves: outboundAccountPosition and balanceUpdate
        {"old": [RECORD], "new": changed(crossMarginFree="0.80000000"), "update_id": 7},
        # a borrow: liabilityChange
        {"old": [RECORD], "new": changed(crossMarginBorrowed="0.05000000"), "update_id": 8},
        # UM and CM wallets: an ACCOUNT_UPDATE each
        {"old": [RECORD], "new": changed(umWalletBalance="0.40000000"), "update_id": 9},
        {"old": [RECORD], "new": changed(cmWalletBalance="0.10000000"), "update_id": 10},
        # an asset arriving, and one leaving
        {"old": [], "new": [RECORD], "update_id": 11},
        {"old": [RECORD], "new": [], "update_id": 12},
        # a shape the API never sends: a position event without assets
        {"old": [RECORD], "new": {"not": "records"}, "update_id": 13},
    ],
    "risk_events": [
        {"old": ACCOUNT, "new": {**ACCOUNT, "accountStatus": status, "uniMMR": "1.10000000"}}
        for status in ("MARGIN_CALL", "SUPPLY_MARGIN", "REDUCE_ONLY", "FORCE_LIQUIDATION")
    ],
    "listen_key_expired": [{}],
    # one fill of the trading load: ACCOUNT_UPDATE (ORDER) and outboundAccountPosition
    "trade_events": [
        {
            "asset": "BTC",
            "before": RECORD,
            "after": {**RECORD, "umWalletBalance": "0.30100000", "crossMarginFree": "0.99000000"},
            "update_id": 14,
            "fs": fs,
        }
        for fs in ("UM", "CM")
    ],
}
#: arguments by parameter name, for a builder without scenarios of its own
ARGUMENTS: dict[str, Any] = {"now_ms": NOW, "update_id": 1, "listen_key": "k" * 64}
#: builders of deliberate misbehaviour (stream faults), and why they are off the contract
OFF_CONTRACT = {
    "unknown_event": "an event type no client knows (the unknown_event and big_frame faults)",
    "listen_key_expired_as_seen": "E as a string and the key itself, as seen in real payloads"
    " but not in the SDK's model (the expire_key fault)",
}
#: every event type the simulator pushes
PUSHED = {
    "outboundAccountPosition",
    "balanceUpdate",
    "liabilityChange",
    "ACCOUNT_UPDATE",
    "riskLevelChange",
    "listenKeyExpired",
}


def builder_functions() -> dict[str, Callable[..., Any]]:
    """The public functions `exporter.simulator.events` defines."""
    return {
        name: function
        for name, function in inspect.getmembers(builders, inspect.isfunction)
        if function.__module__ == builders.__name__ and not name.startswith("_")
    }


def calls(name: str, function: Callable[..., Any]) -> list[dict[str, Any]]:
    """The keyword arguments to call builder `name` with (now_ms added where it takes it)."""
    parameters = inspect.signature(function).parameters
    scenarios = SCENARIOS.get(name)
    if scenarios is None:
        unknown = [
            p.name
            for p in parameters.values()
            if p.name not in ARGUMENTS and p.default is inspect.Parameter.empty
        ]
        assert not unknown, (
            f"builder {name} takes {unknown}: give it scenarios in SCENARIOS"
            " (tests/test_contract_events.py)"
        )
        scenarios = [{}]
    return [
        {
            **{k: v for k, v in ARGUMENTS.items() if k in parameters},
            **scenario,
        }
        for scenario in scenarios
    ]


def built(name: str) -> list[dict[str, Any]]:
    """Every event builder `name` makes over its calls."""
    function = builder_functions()[name]
    out: list[dict[str, Any]] = []
    for kwargs in calls(name, function):
        result = function(**kwargs)
        out.extend(result if isinstance(result, list) else [result])
    return out


def test_every_builder_is_covered() -> None:
    names = builder_functions().keys()
    assert names >= SCENARIOS.keys() | OFF_CONTRACT.keys(), "a listed builder is gone"
    for name, function in builder_functions().items():
        calls(name, function)  # fails naming a builder it cannot call


@pytest.mark.parametrize("name", sorted(builder_functions().keys() - OFF_CONTRACT.keys()))
def test_every_event_a_builder_makes_conforms_to_the_sdk(name: str) -> None:
    events = built(name)
    assert events, f"{name} made no event in its scenarios"
    for index, event in enumerate(events):
        conform_event(json.loads(json.dumps(event)), where=f"{name}#{index}")


def test_the_scenarios_make_every_event_type_the_simulator_pushes() -> None:
    made = {
        event["e"]
        for name in builder_functions().keys() - OFF_CONTRACT.keys()
        for event in built(name)
    }
    assert made >= PUSHED


@pytest.mark.parametrize("name", sorted(OFF_CONTRACT))
def test_off_contract_builders_really_are(name: str) -> None:
    events = built(name)
    failures = []
    for event in events:
        try:
            conform_event(json.loads(json.dumps(event)))
        except ContractError as exc:
            failures.append(exc)
    assert len(failures) == len(events)


def test_a_broken_builder_fails_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the simulator on purpose: a renamed field, a decimal sent as a number, a
    number sent as a string. Each makes the contract test fail."""
    real = builders.risk_events

    @functools.wraps(real)
    def renamed(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        rename = {"u": "uniMMR"}
        return [{rename.get(k, k): v for k, v in e.items()} for e in real(*args, **kwargs)]

    @functools.wraps(real)
    def as_number(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return [{**e, "eq": float(e["eq"])} for e in real(*args, **kwargs)]

    @functools.wraps(real)
    def as_string(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return [{**e, "E": str(e["E"])} for e in real(*args, **kwargs)]

    for broken in (renamed, as_number, as_string):
        monkeypatch.setattr(builders, "risk_events", broken)
        with pytest.raises(ContractError):
            test_every_event_a_builder_makes_conforms_to_the_sdk("risk_events")


# ---------------------------------------------------------------- frames on the wire


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator([SimAccount.hmac("a", "key-a", "secret-a")], assets_per_account=4) as sim:
        yield sim


def open_plain(sim: Simulator, key: str) -> ClientConnection:
    return connect(f"{sim.stream_url}/{key}", proxy=None)


@contextlib.contextmanager
def open_combined(sim: Simulator, key: str) -> Iterator[ClientConnection]:
    """The official SDKs' way: /pm/stream, then SUBSCRIBE the listenKey."""
    base = sim.stream_url.removesuffix("/ws")
    with connect(f"{base}/stream", proxy=None) as ws:
        ws.send(json.dumps({"method": "SUBSCRIBE", "params": [key], "id": 1}))
        assert json.loads(ws.recv(timeout=5)) == {"result": None, "id": 1}
        yield ws


def test_frames_on_the_wire_conform_and_the_combined_form_carries_the_same_events(
    sim: Simulator,
) -> None:
    key = httpx.post(f"{sim.url}/papi/v1/listenKey", headers={"X-MBX-APIKEY": "key-a"}).json()[
        "listenKey"
    ]
    with open_plain(sim, key) as plain, open_combined(sim, key) as combined:
        wait_until(lambda: sim.stream.open_connections("a") == 2, what="both connections")
        sim.set_asset("a", "BTC", crossMarginFree="7.00000000", crossMarginBorrowed="1.00000000")
        info = sim.account_info("a")
        sim.set_account_info("a", {**info, "accountStatus": "MARGIN_CALL"})
        plain_frames = [plain.recv(timeout=5) for _ in range(4)]
        wrapped_frames = [combined.recv(timeout=5) for _ in range(4)]
    kinds = set()
    for text, wrapped_text in zip(plain_frames, wrapped_frames, strict=True):
        event, wrapped = json.loads(text), json.loads(wrapped_text)
        conform_event(event)
        assert wrapped == {"stream": key, "data": event}
        assert parse_frame(wrapped_text) == parse_frame(text)
        kinds.add(event["e"])
    assert kinds == {
        "outboundAccountPosition",
        "balanceUpdate",
        "liabilityChange",
        "riskLevelChange",
    }


class Poller:
    """What the stream wiring calls on an account's poller."""

    def __init__(self) -> None:
        self.triggers: list[tuple[str, Priority]] = []
        self.risks: list[str | None] = []

    def snapshot_of(self, name: str) -> None:
        return None  # an account not refreshed yet

    def trigger(self, name: str, priority: Priority, *_: object) -> None:
        self.triggers.append((name, priority))

    def apply_risk(self, name: str, **risk: Any) -> None:
        self.risks.append(risk["status"])

    def note_pause(self, error: object) -> None:
        pass


def test_a_wrapped_frame_triggers_the_refresh_a_plain_one_does(sim: Simulator) -> None:
    """The simulator's combined form, through the parser and the stream wiring: the same
    refresh (and the same risk applied) as the documented form's frame."""
    key = httpx.post(f"{sim.url}/papi/v1/listenKey", headers={"X-MBX-APIKEY": "key-a"}).json()[
        "listenKey"
    ]
    with open_plain(sim, key) as plain, open_combined(sim, key) as combined:
        wait_until(lambda: sim.stream.open_connections("a") == 2, what="both connections")
        info = sim.account_info("a")
        sim.set_account_info("a", {**info, "accountStatus": "REDUCE_ONLY", "uniMMR": "1.2"})
        frames = {"plain": plain.recv(timeout=5), "combined": combined.recv(timeout=5)}
    seen = {}
    for form, frame in frames.items():
        poller = Poller()
        observer = _AccountObserver("a", poller, StreamHealth(["a"]), lambda: 0.0)  # type: ignore[arg-type]
        observer.stream_event(parse_frame(frame))
        seen[form] = (poller.triggers, poller.risks)
    assert seen["combined"] == seen["plain"] == ([("a", Priority.RISK)], ["REDUCE_ONLY"])


def test_the_simulator_pushes_the_documented_risk_event_for_the_documented_state() -> None:
    """The corpus's riskLevelChange (Binance's example), and the account state it stands
    for: the simulator's builder makes exactly that event from that state."""
    path = Path(__file__).parent / "fixtures" / "binance" / "event_risk_level_change.json"
    documented = json.loads(path.read_text())["payload"]
    state = {
        **ACCOUNT,
        "uniMMR": documented["u"],
        "accountStatus": documented["s"],
        "accountEquity": documented["eq"],
        "actualEquity": documented["ae"],
        "accountMaintMargin": documented["m"],
    }
    assert builders.risk_events(ACCOUNT, state, documented["E"]) == [documented]
    (expired,) = [builders.listen_key_expired(1576653824250)]
    documented_expired = json.loads((path.parent / "event_listen_key_expired.json").read_text())
    assert expired == documented_expired["payload"]
