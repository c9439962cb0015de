"""``${VAR}`` interpolation in every string value of a parsed YAML document.

Forms:
  ``${NAME}``            the variable's value; an undefined variable is a problem
  ``${NAME:-default}``   the value, or ``default`` when undefined or empty; the
                         default may itself hold references (``${A:-${B}}``), which
                         are read only when the default is used
  ``$${``                a literal ``${``
A whole value of the form ``$NAME`` (a shell habit; no Binance key or secret starts with
``$``) is refused with "did you mean ${NAME}?" instead of being used as is.
Mapping keys are never interpolated. A value that fails is replaced by ``""``
and its location reported, so that later checks can skip it. Problems name the
variable, never its value nor the text around it (which may be a secret).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from exporter.config.errors import Loc, Problem

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: a whole value that is a shell-style reference without braces
_BARE = re.compile(r"\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*")
#: defaults nest at most this deep (``${A:-${B:-...}}``)
MAX_NESTING = 8
_MALFORMED = "malformed ${...} reference (write ${NAME} or ${NAME:-default}; $${ for a literal ${)"


class _Failure(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def interpolate(data: object, environ: Mapping[str, str]) -> tuple[object, list[Problem], set[Loc]]:
    """Return ``(data with variables substituted, problems, failed locations)``.

    Shared nodes (YAML aliases) are substituted once; a node that contains
    itself is reported instead of recursing forever.
    """
    problems: list[Problem] = []
    failed: set[Loc] = set()
    done: dict[int, object] = {}
    active: set[int] = set()

    def walk(node: object, loc: Loc) -> object:
        if isinstance(node, str):
            try:
                return substitute(node, environ)
            except _Failure as failure:
                problems.append(Problem(loc, failure.message))
                failed.add(loc)
                return ""
        if not isinstance(node, dict | list):
            return node
        key = id(node)
        if key in done:
            return done[key]
        if key in active:
            problems.append(Problem(loc, "a YAML alias refers to itself"))
            failed.add(loc)
            return None
        active.add(key)
        result: object
        if isinstance(node, dict):
            result = {k: walk(v, (*loc, _loc_part(k))) for k, v in node.items()}
        else:
            result = [walk(v, (*loc, i)) for i, v in enumerate(node)]
        active.discard(key)
        done[key] = result
        return result

    return walk(data, ()), problems, failed


def substitute(text: str, environ: Mapping[str, str]) -> str:
    """Substitute the variables in one string; raise ``_Failure`` on a bad one."""
    bare = _BARE.fullmatch(text)
    if bare is not None:
        name = bare.group(1)
        raise _Failure(f"${name} is not substituted: did you mean ${{{name}}}?")
    if "${" not in text:
        return text
    value, _ = _scan(text, 0, environ, depth=0, used=True)
    return value


def _scan(
    text: str, start: int, environ: Mapping[str, str], *, depth: int, used: bool
) -> tuple[str, int]:
    """Substitute from ``start`` to the end of ``text`` or, in a default (``depth`` > 0),
    to the ``}`` that closes it; return the result and where the scan stopped. A default
    that is not ``used`` is only parsed: its variables need not be set."""
    if depth > MAX_NESTING:
        raise _Failure(f"${{...}} defaults nested more than {MAX_NESTING} deep")
    in_default = depth > 0
    out: list[str] = []
    i = start
    while i < len(text):
        if text.startswith("$${", i):
            out.append("${")
            i += 3
        elif text.startswith("${", i):
            value, i = _reference(text, i + 2, environ, depth=depth, used=used)
            out.append(value)
        elif in_default and text[i] == "}":
            return "".join(out), i
        else:
            out.append(text[i])
            i += 1
    if in_default:
        raise _Failure(_MALFORMED)
    return "".join(out), i


def _reference(
    text: str, start: int, environ: Mapping[str, str], *, depth: int, used: bool
) -> tuple[str, int]:
    """The value of the reference whose name starts at ``start``, and the index after it."""
    match = _NAME.match(text, start)
    if match is None:
        raise _Failure(_MALFORMED)
    name, i = match.group(), match.end()
    value = environ.get(name)
    if text.startswith("}", i):
        if value is None and used:
            raise _Failure(f"environment variable {name} is not set")
        return value or "", i + 1
    if text.startswith(":-", i):
        default, i = _scan(text, i + 2, environ, depth=depth + 1, used=used and not value)
        return value or default, i + 1
    raise _Failure(_MALFORMED)


def _loc_part(key: object) -> str | int:
    return key if isinstance(key, str) else str(key)
