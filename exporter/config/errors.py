"""Config problems: one readable line each, naming the field path, never a secret.

A problem is located by a path into the YAML document (``("accounts", 1,
"api_secret_file")``) and rendered as ``accounts[1].api_secret_file: <message>``.
Pydantic's own error text is never shown as is: it can carry the input value,
and an input value may be a secret. Validation errors are converted here into
messages that show an input only when it is a number or a boolean in a field
that cannot hold a secret.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError
from pydantic_core import ErrorDetails

Loc = tuple[str | int, ...]

# A field whose name contains one of these may hold a secret (or, for a proxy
# URL, credentials): its input value is never described beyond its type.
_SENSITIVE = ("key", "secret", "passphrase", "proxy", "password", "token")
_MAX_KEY_SHOWN = 40


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

    def __str__(self) -> str:
        return f"{format_loc(self.loc)}: {self.message}"


def format_loc(loc: Loc) -> str:
    """``("accounts", 1, "name")`` -> ``accounts[1].name``; ``()`` -> ``(top level)``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{_shorten(part)}" if out else _shorten(part)
    return out or "(top level)"


def format_problems(problems: Iterable[Problem]) -> list[str]:
    """Render problems as lines, each a single line (newlines folded)."""
    return [" ".join(str(p).splitlines()) for p in problems]


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


def problems_from_validation(
    error: ValidationError, prefix: Loc = (), known_keys: dict[Loc, Sequence[str]] | None = None
) -> list[Problem]:
    """Convert a pydantic ``ValidationError`` into clean problems.

    ``known_keys`` maps a mapping's location (without ``prefix``) to its allowed
    keys, so that an unknown key gets a "did you mean" hint.
    """
    problems = []
    for detail in error.errors(include_url=False, include_input=True, include_context=True):
        loc = _clean_loc(detail["loc"])
        problems.append(
            Problem(prefix + loc, _message(detail, prefix + loc, known_keys or {}, loc))
        )
    return problems


def _clean_loc(loc: tuple[int | str, ...]) -> Loc:
    # Pydantic adds the validator's name for function validators and union
    # members (e.g. "function-after[...]"); those are not places in the YAML.
    return tuple(
        part for part in loc if not (isinstance(part, str) and "[" in part and "]" in part)
    )


def _message(
    detail: ErrorDetails, loc: Loc, known_keys: dict[Loc, Sequence[str]], local_loc: Loc
) -> str:
    kind = detail["type"]
    got = describe_input(detail.get("input"), sensitive=is_sensitive(loc))
    simple = {
        "missing": "required",
        "string_type": f"must be a string (got {got})",
        "int_type": f"must be an integer (got {got})",
        "int_parsing": f"must be an integer (got {got})",
        "int_from_float": f"must be an integer (got {got})",
        "float_type": f"must be a number (got {got})",
        "float_parsing": f"must be a number (got {got})",
        "finite_number": "must be a finite number",
        "bool_type": f"must be true or false (got {got})",
        "bool_parsing": f"must be true or false (got {got})",
        "list_type": f"must be a list (got {got})",
        "dict_type": f"must be a mapping (got {got})",
        "model_type": f"must be a mapping (got {got})",
        "model_attributes_type": f"must be a mapping (got {got})",
        "invalid_key": "mapping keys must be strings",
        "string_too_short": "must not be empty",
    }
    if kind in simple:
        return simple[kind]
    if kind == "extra_forbidden":
        return _unknown_key(loc, known_keys.get(local_loc[:-1], ()))
    if kind == "too_short":
        return f"must have at least {detail.get('ctx', {}).get('min_length', 1)} item(s)"
    # Our own PydanticCustomError messages are written to be safe; pydantic's
    # built-in `msg` never contains the input value.
    return detail["msg"]


def _unknown_key(loc: Loc, allowed: Sequence[str]) -> str:
    key = loc[-1] if loc else ""
    hint = ""
    if isinstance(key, str) and allowed:
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (allowed: {', '.join(allowed)})"
    return f"unknown key{hint}"


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_KEY_SHOWN else text[: _MAX_KEY_SHOWN - 3] + "..."
