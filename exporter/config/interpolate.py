"""``${VAR}`` interpolation in every string value of a parsed YAML document.

Forms:
  ``${NAME}``            the variable's value; an undefined variable is a problem
  ``${NAME:-default}``   the value, or ``default`` when undefined or empty
  ``$${``                a literal ``${``
Mapping keys are never interpolated. A value that fails is replaced by ``""``
and its location reported, so that later checks can skip it. Problems name the
variable, never its value nor the text around it (which may be a secret).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from exporter.config.errors import Loc, Problem

_TOKEN = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)\}|\$\{")
_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)


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
    if "${" not in text:
        return text

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        body = match.group("body")
        parsed = _BODY.fullmatch(body) if body is not None else None
        if parsed is None:
            raise _Failure(
                "malformed ${...} reference (write ${NAME} or ${NAME:-default}; "
                "$${ for a literal ${)"
            )
        name, default = parsed.group("name"), parsed.group("default")
        value = environ.get(name)
        if default is not None:
            return value if value else default
        if value is None:
            raise _Failure(f"environment variable {name} is not set")
        return value

    return _TOKEN.sub(replace, text)


def _loc_part(key: object) -> str | int:
    return key if isinstance(key, str) else str(key)
