"""Config problems: one readable line each, naming the field path, never a secret.

A problem is located by a path into the YAML document (``("accounts", 1,
"api_secret_file")``) and rendered as ``accounts[1].api_secret_file: <message>``.
Pydantic's own error text is never shown as is: it can carry the input value,
and an input value may be a secret. Validation errors are converted here into
messages that show an input only when it is a number or a boolean in a field
that cannot hold a secret. A key that is not a field of the schema (a typo, or a
secret pasted where a key belongs) is shown whole only when it is short or a near
typo of a field; otherwise by its first characters and its length.

The exporter's config and the web config (``--web.config.file``) both report
their problems through this module.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

Loc = tuple[str | int, ...]

# A field whose name contains one of these may hold a secret (or, for a proxy
# URL, credentials): its input value is never described beyond its type.
_SENSITIVE = ("key", "secret", "passphrase", "proxy", "password", "token", "basic_auth")
#: a key that is neither a field name nor a near typo of one is shown whole up to this length
SHORT_KEY = 12
#: ... and beyond it, only this many of its first characters
KEY_HEAD = 4


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


@dataclass(frozen=True)
class Problem:
    """One problem at one place in the document."""

    loc: Loc
    message: str

    def render(self, names: Collection[str]) -> str:
        """``<path>: <message>`` on one line; ``names`` are the schema's field names."""
        return " ".join(f"{format_loc(self.loc, names)}: {self.message}".splitlines())


def format_loc(loc: Loc, names: Collection[str]) -> str:
    """``("accounts", 1, "name")`` -> ``accounts[1].name``; ``()`` -> ``(top level)``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{shown_key(part, names)}" if out else shown_key(part, names)
    return out or "(top level)"


def shown_key(key: str, names: Collection[str]) -> str:
    """A mapping key as a message may show it.

    A field name, a near typo of one, or a short key is shown whole; any other key
    (perhaps a secret pasted where a key belongs) only by its first characters and
    its length.
    """
    key = " ".join(key.split())
    if key in names or len(key) <= SHORT_KEY or difflib.get_close_matches(key, names, n=1):
        return key
    return f"{key[:KEY_HEAD]}...({len(key)} characters)"


def format_problems(problems: Iterable[Problem], names: Collection[str]) -> list[str]:
    """Render problems as lines, each a single line (newlines folded); ``names`` are the
    schema's field names, shown whole in a path."""
    return [p.render(names) for p in problems]


def is_sensitive(loc: Loc) -> bool:
    """True when the field at ``loc`` may hold a secret or credentials."""
    return any(
        isinstance(part, str) and any(word in part.lower() for word in _SENSITIVE) for part in loc
    )


def describe_input(value: object, *, sensitive: bool) -> str:
    """A short description of an input value that is safe to print.

    Numbers and booleans are shown as they are unless the field is sensitive;
    anything else only by its kind.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean" if sensitive else str(value).lower()
    if isinstance(value, int | float):
        return "a number" if sensitive else repr(value)
    if isinstance(value, str):
        return "an empty string" if value == "" else "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} value"


# ---- the schema, read from the models ----------------------------------------


def schema_keys(model: type[BaseModel]) -> dict[Loc, tuple[str, ...]]:
    """The keys each mapping of a model tree allows, by location (``()``: the model's own)."""
    keys: dict[Loc, tuple[str, ...]] = {}

    def walk(node: type[BaseModel], loc: Loc) -> None:
        keys[loc] = tuple(node.model_fields)
        for name, field in node.model_fields.items():
            for child in _models_in(field.annotation):
                walk(child, (*loc, name))

    walk(model, ())
    return keys


def field_names(*models: type[BaseModel]) -> frozenset[str]:
    """Every field name in the model trees: keys a message may show whole."""
    return frozenset(
        name for model in models for names in schema_keys(model).values() for name in names
    )


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def _field_at(model: type[BaseModel], loc: Loc) -> FieldInfo | None:
    field = None
    models = [model]
    for part in loc:
        fields = [m.model_fields.get(part) for m in models] if isinstance(part, str) else []
        field = next((f for f in fields if f is not None), None)
        if field is None:
            return None
        models = _models_in(field.annotation)
    return field


# ---- pydantic's errors as problems -------------------------------------------


def problems_from_validation(
    error: ValidationError, model: type[BaseModel], prefix: Loc = ()
) -> list[Problem]:
    """Convert a pydantic ``ValidationError`` of ``model`` into clean problems.

    The model tree gives an unknown key its "did you mean" hint and a bound its
    whole range.
    """
    keys = schema_keys(model)
    problems = []
    for detail in error.errors(include_url=False, include_input=True, include_context=True):
        loc = _clean_loc(detail["loc"])
        message = _message(detail, prefix + loc, keys.get(loc[:-1], ()), model, loc)
        problems.append(Problem(prefix + loc, message))
    return problems


def _clean_loc(loc: tuple[int | str, ...]) -> Loc:
    # Pydantic adds the validator's name for function validators and union
    # members (e.g. "function-after[...]", "[key]"); those are not places in the YAML.
    return tuple(
        part for part in loc if not (isinstance(part, str) and "[" in part and "]" in part)
    )


_SIMPLE = {
    "missing": "required",
    "string_type": "must be a string (got {got})",
    "int_type": "must be an integer (got {got})",
    "int_parsing": "must be an integer (got {got})",
    "int_from_float": "must be an integer (got {got})",
    "float_type": "must be a number (got {got})",
    "float_parsing": "must be a number (got {got})",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false (got {got})",
    "bool_parsing": "must be true or false (got {got})",
    "list_type": "must be a list (got {got})",
    "dict_type": "must be a mapping (got {got})",
    "model_type": "must be a mapping (got {got})",
    "model_attributes_type": "must be a mapping (got {got})",
    "invalid_key": "mapping keys must be strings",
    "string_too_short": "must not be empty",
}
#: the bounds Field(gt=..., ...) puts in a field's metadata, in the order a message names them
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _message(
    detail: ErrorDetails,
    loc: Loc,
    allowed: Sequence[str],
    model: type[BaseModel],
    local_loc: Loc,
) -> str:
    kind = detail["type"]
    value = detail.get("input")
    if kind in _SIMPLE:
        return _SIMPLE[kind].format(got=describe_input(value, sensitive=is_sensitive(loc)))
    if kind == "extra_forbidden":
        return _unknown_key(loc, allowed)
    if kind == "too_short":
        return f"must have at least {detail.get('ctx', {}).get('min_length', 1)} item(s)"
    if kind == "literal_error":
        return f"must be one of {detail.get('ctx', {}).get('expected', '')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return _out_of_range(_field_at(model, local_loc), value)
    # Our own PydanticCustomError messages are written to be safe; pydantic's
    # built-in `msg` never contains the input value.
    return detail["msg"]


def _out_of_range(field: FieldInfo | None, value: object) -> str:
    """``must be > 0 and <= 1 (got 2)``: the field's whole range, and the number given."""
    metadata = field.metadata if field is not None else []
    bounds = [
        f"{symbol} {_number(getattr(m, attribute))}"
        for attribute, symbol in _BOUNDS
        for m in metadata
        if getattr(m, attribute, None) is not None
    ]
    return f"must be {' and '.join(bounds) or 'in range'} (got {_number(value)})"


def _number(value: object) -> str:
    # Only for numeric fields, which never hold a secret; a string input parsed as a number.
    if isinstance(value, str):
        try:
            value = Decimal(value.strip())
        except ArithmeticError:
            return "a number"
    if isinstance(value, int | float | Decimal):
        try:
            return f"{float(value):g}"
        except OverflowError:
            return f"{Decimal(value):.6g}"
    return "a number"


def _unknown_key(loc: Loc, allowed: Sequence[str]) -> str:
    key = loc[-1] if loc else ""
    hint = ""
    if isinstance(key, str) and allowed:
        # a key that begins with what was typed first (`account` -> account_info, not
        # um_account), else the closest
        close = [a for a in allowed if key and a.startswith(key)][:1] or (
            difflib.get_close_matches(key, allowed, n=1)
        )
        hint = f" (did you mean {close[0]}?)" if close else f" (allowed: {', '.join(allowed)})"
    return f"unknown key{hint}"
