"""The simulator's own HTTP controls under /_sim/ (no weight; loopback clients only).

    PUT    /_sim/balances/{account}        body: list of records, served as is (any JSON)
    PATCH  /_sim/assets/{account}/{asset}  body: fields to set on that asset
    DELETE /_sim/assets/{account}/{asset}
    PUT    /_sim/account/{account}         body: the /papi/v1/account object (any JSON)
    POST   /_sim/faults                    body: {"kind": ..., "endpoint": ..., "account": ...,
                                                  "count": ..., <params>}
    DELETE /_sim/faults                    REST faults, and the stream's refusals and silence
    POST   /_sim/stream/faults             body: {"kind": ..., "account": ..., <params>}
                                           (kinds and params: state.STREAM_FAULT_PARAMS)
    PUT    /_sim/clock                     body: {"offset_ms": n}
    PATCH  /_sim/prices                    body: {symbol: price or null (removes it)}
    PATCH  /_sim/symbols                   body: {symbol: "TRADING", "HALT" or "BREAK"}
    GET    /_sim/requests                  the request log
    GET    /_sim/weight?ip=127.0.0.1       {"ip": ..., "weight": used this minute}
    POST   /_sim/foreign-weight            body: {"ip": ..., "weight": n}
Answers are JSON; errors are {"error": "..."} with 400, 403, 404 or 405.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from typing import Any
from urllib.parse import parse_qs, unquote

from exporter.simulator.state import SimState, UnknownAccountError

PREFIX = "/_sim/"


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def handle_admin(
    state: SimState, *, method: str, path: str, query: str, body: bytes, client_ip: str
) -> tuple[int, Any]:
    """(HTTP status, JSON answer) for one admin request."""
    try:
        _check_loopback(client_ip)
        parts = [unquote(part) for part in path[len(PREFIX) :].split("/")]
        return 200, _route(state, method, parts, query, body)
    except AdminError as error:
        return error.status, {"error": str(error)}
    except UnknownAccountError as error:
        return 404, {"error": str(error)}
    except (ValueError, TypeError) as error:
        return 400, {"error": str(error)}


def _check_loopback(client_ip: str) -> None:
    if not ipaddress.ip_address(client_ip).is_loopback:
        raise AdminError(403, "the simulator's controls answer loopback clients only")


def _route(state: SimState, method: str, parts: list[str], query: str, body: bytes) -> Any:
    match parts, method:
        case ["balances", account], "PUT":
            state.book.set_balances(account, _json(body, object))  # bad shapes welcome
        case ["assets", account, asset], "PATCH":
            state.book.set_asset(account, asset, _json(body, dict))
        case ["assets", account, asset], "DELETE":
            state.book.remove_asset(account, asset)
        case ["account", account], "PUT":
            state.book.set_account_info(account, _json(body, object))
        case ["faults"], "POST":
            spec = _json(body, dict)
            kind = spec.pop("kind", None)
            if not isinstance(kind, str):
                raise AdminError(400, 'a fault needs "kind"')
            state.inject_fault(kind, **spec)
        case ["faults"], "DELETE":
            state.faults.clear()
            state.stream.clear()
        case ["stream", "faults"], "POST":
            spec = _json(body, dict)
            kind = spec.pop("kind", None)
            if not isinstance(kind, str):
                raise AdminError(400, 'a fault needs "kind"')
            state.stream_fault(kind, **spec)
        case ["prices"], "PATCH":
            for symbol, price in _json(body, dict).items():
                state.prices.set(symbol, price)
        case ["symbols"], "PATCH":
            for symbol, status in _json(body, dict).items():
                state.prices.set_status(symbol, status)
        case ["clock"], "PUT":
            offset = _json(body, dict).get("offset_ms")
            if not isinstance(offset, int) or isinstance(offset, bool):
                raise AdminError(400, '"offset_ms" must be an integer')
            state.clock_offset_ms = offset
        case ["requests"], "GET":
            return [dataclasses.asdict(record) for record in state.log.snapshot()]
        case ["weight"], "GET":
            ip = parse_qs(query).get("ip", ["127.0.0.1"])[0]
            return {"ip": ip, "weight": state.weights.used(ip, state.now_ms())}
        case ["foreign-weight"], "POST":
            spec = _json(body, dict)
            ip, weight = spec.get("ip"), spec.get("weight")
            if not isinstance(ip, str) or not isinstance(weight, int) or isinstance(weight, bool):
                raise AdminError(400, 'needs "ip" (string) and "weight" (integer)')
            state.weights.add(ip, weight, state.now_ms())
        case (
            (
                ["balances", _]
                | ["assets", _, _]
                | ["account", _]
                | ["faults"]
                | ["stream", "faults"]
                | ["clock"]
                | ["prices"]
                | ["symbols"]
                | ["requests"]
                | ["weight"]
                | ["foreign-weight"]
            ),
            _,
        ):
            raise AdminError(405, f"method {method} not allowed here")
        case _:
            raise AdminError(404, "no such control")
    return {"ok": True}


def _json(body: bytes, expected: type[Any]) -> Any:
    try:
        value = json.loads(body or b"null")
    except ValueError as error:
        raise AdminError(400, f"body is not JSON: {error}") from None
    if not isinstance(value, expected):
        raise AdminError(400, "body must be a JSON object")
    return value
