"""Safe YAML parsing with errors as ``LINE:COL`` and a message that never quotes
the document (a line of YAML may hold an inline secret). The exporter's config
and the web config (``--web.config.file``) are both read with it."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from exporter.config.errors import shown_key

_MERGE_TAG = "tag:yaml.org,2002:merge"
_HAS_LIBYAML = bool(getattr(yaml, "__with_libyaml__", False))


class YamlError(Exception):
    """A document that is not valid YAML; ``where`` is ``LINE:COL`` (1-based).

    ``str()`` is ``LINE:COL: YAML syntax error: <problem>``: put the file's path before it.
    """

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: YAML syntax error: {problem}")
        self.where = where
        self.problem = problem


def _refuse_duplicate_keys(
    loader: yaml.constructor.SafeConstructor, node: yaml.MappingNode, names: Collection[str]
) -> None:
    """Refuse a mapping key given twice instead of keeping the last.

    Keys are compared by value, as the mapping would store them (``1`` and ``01``,
    ``true`` and ``yes`` collide), as Go's yaml.UnmarshalStrict does. Keys merged in
    with ``<<`` may be overridden, as YAML allows. ``names`` (the schema's field names)
    are quoted whole in the message.
    """
    seen: set[object] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue  # a collection as a key is refused by SafeLoader itself
        key = loader.construct_object(key_node)
        if key in seen:
            shown = shown_key(key_node.value, names)
            raise ConstructorError(None, None, f"duplicate key {shown!r}", key_node.start_mark)
        seen.add(key)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader (pure Python) that refuses duplicate keys: precise messages."""

    #: the schema's field names, which a message may quote whole
    names: Collection[str] = ()

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _refuse_duplicate_keys(self, node, self.names)
        return super().construct_mapping(node, deep)


class _FastStrictLoader(yaml.CSafeLoader):
    """The same on libyaml's parser, for many small files (accounts_dir): about 10x faster;
    its syntax errors word a few problems differently."""

    names: Collection[str] = ()

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _refuse_duplicate_keys(self, node, self.names)
        return super().construct_mapping(node, deep)


def parse_yaml(raw: bytes, names: Collection[str] = (), *, fast: bool = False) -> object:
    """Parse one YAML document (UTF-8); raise ``YamlError``.

    ``names`` are the schema's field names: a duplicate key among them is quoted whole,
    any other only as far as ``shown_key`` allows. ``fast``: with libyaml's parser, where
    PyYAML has it (500 account files: 3.3 s of parsing in Python, 0.3 s with libyaml)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, col = _line_col(raw[: exc.start].decode("utf-8", errors="replace"), None)
        raise YamlError(f"{line}:{col}", "not valid UTF-8") from None
    try:
        loader = (_FastStrictLoader if fast and _HAS_LIBYAML else _StrictLoader)(text)
        loader.names = names
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
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
