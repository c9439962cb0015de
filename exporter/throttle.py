"""Log lines about what a peer sends, at a rate the peer cannot set.

A hostile or broken upstream can send a malformed frame, a bad record or a new
unpriced asset as often as it likes; one line each would let it fill the disk
(200,000 lines in 20 s). `LogThrottle` lets one line per key through per
interval and counts the ones it held back, so the next line says how many.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

#: at most one line per key per this many seconds
LOG_INTERVAL_SECONDS = 60.0


class LogThrottle:
    """`allow(key)`: None while `key` has had a line within `interval` seconds, else the
    number of its lines held back since its last one (log this one with that count)."""

    def __init__(
        self, interval: float = LOG_INTERVAL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        #: key -> (when its last line went out, lines held back since)
        self._last: dict[Hashable, tuple[float, int]] = {}

    def allow(self, key: Hashable) -> int | None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last[key] = (now, 0)
        return 0 if last is None else last[1]

    def forget(self, key: Hashable) -> None:
        """Drop what is known of `key` (an account a reload removed)."""
        self._last.pop(key, None)
