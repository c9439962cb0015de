"""The one check for strings from outside that become label values.

Asset names and account statuses come from Binance (REST), from the user data stream
and from the state file; each becomes a label value on /metrics. A value that is not
valid UTF-8 (a lone surrogate such as "X\\ud800" encodes to nothing), that holds a
control or other non-printable character (a newline would split an exposition line or
a log line), or that is longer than `LABEL_MAX_CHARS`, costs its record at the input
boundary, never the scrape: the parsers and the state file's reader call `label_problem`
and drop the record.

Standard library only: the parsers, storage and the tests use it.
"""

from __future__ import annotations

#: the longest label value taken from outside, in characters (Binance's asset names and
#: statuses are under 20)
LABEL_MAX_CHARS = 128


def label_problem(value: object, max_chars: int = LABEL_MAX_CHARS) -> str | None:
    """Why `value` cannot be a label value (a short reason that never quotes it), or None."""
    if not isinstance(value, str):
        return "not a string"
    if not value:
        return "empty"
    if len(value) > max_chars:
        return f"longer than {max_chars} characters"
    if not value.isprintable():  # also every surrogate (category Cs): checked first, cheaply
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid UTF-8 (a lone surrogate)"
        return "control or other non-printable characters"
    return None


def is_label(value: object, max_chars: int = LABEL_MAX_CHARS) -> bool:
    """`value` can be a label value as it is."""
    return label_problem(value, max_chars) is None
