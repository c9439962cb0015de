"""Shutdown always ends: after a stop signal, the process is gone within a deadline.

A stop (SIGTERM, SIGINT) lets in-flight requests finish within their grace, writes the
state file and exits 0. But a thread can be stuck where nothing can cancel it: a read
of a file that never ends, a reload waiting on one. Python then waits for that thread
at exit, forever. `ShutdownWatchdog` is armed by the stop signal; if the process still
runs `deadline` seconds later it logs one `shutdown_stuck` line naming each thread and
where it is (file, line and function: never a variable, so never a secret) and what the
exporter was doing, then ends the process with `EXIT_STUCK` at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import structlog

log = structlog.get_logger("exporter")

#: seconds from the stop signal to the process's end, whatever is stuck
SHUTDOWN_DEADLINE_SECONDS = 9.0
#: the exit code when the watchdog ended the process
EXIT_STUCK = 1


class ShutdownWatchdog:
    def __init__(
        self,
        deadline: float = SHUTDOWN_DEADLINE_SECONDS,
        activity: Callable[[], list[str]] = list,
        *,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self.deadline = deadline
        self._activity = activity
        self._exit = exit
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def arm(self, reason: str) -> None:
        """Start counting (once; a second signal changes nothing)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._watch, args=(reason,), name="shutdown-watchdog", daemon=True
            )
            self._thread.start()

    def _watch(self, reason: str) -> None:
        threading.Event().wait(self.deadline)
        try:
            activity = self._activity()
        except Exception as exc:
            activity = [f"(unknown: {type(exc).__name__})"]
        log.error(
            "shutdown_stuck",
            signal=reason,
            deadline_seconds=self.deadline,
            activity=activity,
            threads=stuck_threads(),
            exit_code=EXIT_STUCK,
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        self._exit(EXIT_STUCK)


def stuck_threads() -> list[str]:
    """Each other thread and where it is: `name: file:line in function`, the innermost
    place, and the innermost place in the exporter's code when that is another."""
    frames = sys._current_frames()  # the documented way to see other threads
    package = str(Path(__file__).resolve().parent)
    found = []
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.ident is None:
            continue
        innermost = frame = frames.get(thread.ident)
        ours = None
        while frame is not None and ours is None:
            if frame.f_code.co_filename.startswith(package):
                ours = frame
            frame = frame.f_back
        if innermost is None:
            found.append(thread.name)
            continue
        where = f"{thread.name}: {_place(innermost)}"
        if ours is not None and ours is not innermost:
            where += f" (in the exporter: {_place(ours)})"
        found.append(where)
    return found


def _place(frame: FrameType) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{frame.f_lineno} in {code.co_name}"
