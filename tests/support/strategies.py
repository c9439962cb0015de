"""Hypothesis strategies the fuzz tests share."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def json_like(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`scalars`, and lists and string-keyed objects of them nested a few levels: what a
    JSON (or YAML) document can hold, small."""
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )
