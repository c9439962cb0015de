"""Safe YAML parsing with errors as ``LINE:COL`` and a message that never quotes
the document (a line of YAML may hold an inline secret)."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError

_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_KEY_SHOWN = 40


class YamlError(Exception):
    """A document that is not valid YAML; ``where`` is ``LINE:COL`` (1-based)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                key = (key_node.tag, key_node.value)
                if key in seen:
                    shown = " ".join(key_node.value.split())[:_MAX_KEY_SHOWN]
                    raise ConstructorError(
                        None, None, f"duplicate key {shown!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(raw: bytes) -> object:
    """Parse one YAML document (UTF-8); raise ``YamlError``."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, col = _line_col(raw[: exc.start].decode("utf-8", errors="replace"), None)
        raise YamlError(f"{line}:{col}", "not valid UTF-8") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{mark.line + 1}:{mark.column + 1}" if mark is not None else "1:1"
        problem = exc.problem or "invalid YAML"
        if exc.context:
            # e.g. "while scanning a quoted scalar (at 5:17); found unexpected end of stream"
            context_at = exc.context_mark
            at = f" (at {context_at.line + 1}:{context_at.column + 1})" if context_at else ""
            problem = f"{exc.context}{at}; {problem}"
        raise YamlError(where, _one_line(problem)) from None
    except yaml.reader.ReaderError as exc:
        line, col = _line_col(text, exc.position)
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise YamlError(
            f"{line}:{col}", f"unacceptable character #x{char:04x}: {_one_line(exc.reason)}"
        ) from None
    except Exception:
        # PyYAML's constructors raise assorted errors for values they cannot
        # build (`!!int abc`, a date out of range, very deep nesting).
        raise YamlError("1:1", "a value cannot be parsed") from None


def _line_col(text: str, position: int | None) -> tuple[int, int]:
    before = text if position is None else text[:position]
    line = before.count("\n") + 1
    return line, len(before) - (before.rfind("\n") + 1) + 1


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
