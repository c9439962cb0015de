"""Binance's official PM SDK as a contract: does a payload say what Binance's models say?

The models are the SDK's own pydantic classes
(`binance-sdk-derivatives-trading-portfolio-margin`, pinned in pyproject's `test` extra).
They are lenient on their own: every field is optional, unknown keys land in
`additional_properties` (or are dropped by `model_validate`), and the SDK's client
retries a failed validation with the models' strictness removed. So `conform` asks more:

- every value validates with the model's strict types (`StrictStr`: a number where the
  SDK wants a decimal string fails, and the reverse for `StrictInt`), called directly,
  never through the SDK's relaxing client;
- every key is one the model declares (its aliases), recursively: a renamed field fails;
- with `complete`, every declared key is there: a dropped field fails (REST answers).

Loading: only the models. The SDK's package brings `aiohttp`, `requests`, `urllib3`,
`pycryptodome` and `binance-common` for its transport; none conflicts with ours today
(`pip check` is clean), but the contract needs none of them: the model files import
only pydantic. So `_models_only()` puts bare package modules (with their `__path__`)
in `sys.modules` for the SDK's package and its `models` subpackages, and the model files
are imported from there without running any package `__init__` (which would import the
clients). Were a transport dependency ever to conflict, installing the pinned SDK with
`pip install --no-deps` would be enough.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

SDK = "binance_sdk_derivatives_trading_portfolio_margin"


def _models_only() -> None:
    """Make the SDK's model modules importable without its package `__init__`s."""
    spec = importlib.util.find_spec(SDK)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{SDK} is not installed: pip install -e '.[test]'")
    root = spec.submodule_search_locations[0]
    for part in (
        "",
        ".rest_api",
        ".rest_api.models",
        ".websocket_streams",
        ".websocket_streams.models",
    ):
        name = SDK + part
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [root + part.replace(".", "/")]
            sys.modules[name] = package


def _model(module: str, name: str) -> Any:
    return getattr(importlib.import_module(f"{SDK}.{module}"), name)


_models_only()
AccountBalanceResponse1Inner = _model(
    "rest_api.models.account_balance_response1_inner", "AccountBalanceResponse1Inner"
)
AccountBalanceResponse2 = _model(
    "rest_api.models.account_balance_response2", "AccountBalanceResponse2"
)
AccountInformationResponse = _model(
    "rest_api.models.account_information_response", "AccountInformationResponse"
)
GetUmAccountDetailResponse = _model(
    "rest_api.models.get_um_account_detail_response", "GetUmAccountDetailResponse"
)
GetCmAccountDetailResponse = _model(
    "rest_api.models.get_cm_account_detail_response", "GetCmAccountDetailResponse"
)
StartUserDataStreamResponse = _model(
    "rest_api.models.start_user_data_stream_response", "StartUserDataStreamResponse"
)
events_module = importlib.import_module(
    f"{SDK}.websocket_streams.models.user_data_stream_events_response"
)

#: the SDK's event models by the `e` the payload carries (its own table)
EVENT_MODELS: dict[str, type[BaseModel]] = dict(
    events_module.USERDATASTREAMEVENTSRESPONSE_EVENT_SCHEMA_MAP
)
#: REST answers: GET /papi/v1/balance (each record without `asset`; the object with it),
#: GET /papi/v1/account, POST /papi/v1/listenKey
BALANCE_RECORD = AccountBalanceResponse1Inner
BALANCE_ONE_ASSET = AccountBalanceResponse2
ACCOUNT = AccountInformationResponse
LISTEN_KEY = StartUserDataStreamResponse
#: GET /papi/v1/um/account and /papi/v1/cm/account (the margin collectors)
UM_ACCOUNT = GetUmAccountDetailResponse
CM_ACCOUNT = GetCmAccountDetailResponse
#: fields of the generated models that are not payload keys
_NOT_KEYS = frozenset({"additional_properties"})


class ErrorBody(BaseModel):
    """An error answer as the SDK reads it (`binance_common.utils.send_request`: the JSON
    body's `code` and `msg`, read only when Content-Type is application/json). The SDK
    has no model for it: this is one, and it forbids anything else."""

    model_config = ConfigDict(extra="forbid", strict=True)

    code: StrictInt
    msg: StrictStr


class ContractError(AssertionError):
    pass


def declared(model: type[BaseModel]) -> set[str]:
    """The payload keys `model` declares (its fields' aliases)."""
    return {
        field.alias or name for name, field in model.model_fields.items() if name not in _NOT_KEYS
    }


def conform(
    model: type[BaseModel],
    payload: Any,
    *,
    complete: bool = False,
    allowed: frozenset[str] = frozenset(),
    where: str = "$",
) -> None:
    """Raise `ContractError` naming the first place where `payload` departs from `model`:
    a strict-type failure, a key the model does not declare (`allowed` excepted, at the top
    level), or, with `complete`, a declared key missing (at every level)."""
    if not isinstance(payload, dict):
        raise ContractError(f"{where}: a JSON {type(payload).__name__}, not an object")
    keys = set(payload)
    names = declared(model)
    unknown = keys - names - allowed
    if unknown:
        raise ContractError(f"{where}: keys the SDK's {model.__name__} lacks: {sorted(unknown)}")
    if complete and (missing := names - keys):
        raise ContractError(
            f"{where}: keys of the SDK's {model.__name__} missing: {sorted(missing)}"
        )
    try:
        model.model_validate({k: v for k, v in payload.items() if k in names})
    except ValueError as exc:  # pydantic's ValidationError
        raise ContractError(f"{where}: {model.__name__}: {exc}") from None
    for name, field in model.model_fields.items():
        key = field.alias or name
        if name in _NOT_KEYS or payload.get(key) is None:
            continue
        nested, is_list = _nested_model(field.annotation)
        if nested is None:
            continue
        value = payload[key]
        items = value if is_list else [value]
        for index, item in enumerate(items):
            at = f"{where}.{key}[{index}]" if is_list else f"{where}.{key}"
            conform(nested, item, complete=complete, where=at)


def conform_event(event: Any, *, where: str = "event") -> type[BaseModel]:
    """`event` (a decoded frame) is one the SDK knows by its `e`, and conforms to that
    event's model (`e` being the only key the models leave to the SDK's lookup)."""
    if not isinstance(event, dict) or not isinstance(event.get("e"), str):
        raise ContractError(f"{where}: no string `e`")
    model = EVENT_MODELS.get(event["e"])
    if model is None:
        raise ContractError(f"{where}: the SDK knows no event named {event['e']!r}")
    conform(model, event, allowed=frozenset({"e"}), where=f"{where}<{event['e']}>")
    return model


def conform_error(body: Any, *, where: str = "error") -> None:
    try:
        ErrorBody.model_validate(body)
    except ValueError as exc:
        raise ContractError(f"{where}: not {{code: int, msg: str}}: {exc}") from None


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the BaseModel inside Optional[...] / List[...], whether it is a list)."""
    is_list = False
    todo = [annotation]
    while todo:
        current = todo.pop()
        origin = typing.get_origin(current)
        if origin in (list, typing.List):  # noqa: UP006 - the SDK's annotations use List
            is_list = True
        if origin in (typing.Union, types.UnionType, list, typing.List):  # noqa: UP006
            todo.extend(typing.get_args(current))
        elif isinstance(current, type) and issubclass(current, BaseModel):
            return current, is_list
    return None, False
