"""The shutdown watchdog (exporter/watchdog.py): armed by a stop signal, it ends a process
that something keeps from exiting, after one line saying what."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import structlog.testing

from exporter.watchdog import EXIT_STUCK, ShutdownWatchdog, stuck_threads


def _stuck_in_a_fifo(fifo: Path, opened: threading.Event) -> None:
    opened.set()
    with fifo.open("rb"):  # blocks in open() until a writer comes: never, here
        pass


def test_a_thread_stuck_in_a_fifo_is_named_and_the_process_ends(tmp_path: Path) -> None:
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    opened = threading.Event()
    stuck = threading.Thread(
        target=_stuck_in_a_fifo, args=(fifo, opened), name="config-reader", daemon=True
    )
    stuck.start()
    opened.wait(5)
    exits: list[int] = []
    exited = threading.Event()

    def fake_exit(code: int) -> None:
        exits.append(code)
        exited.set()

    watchdog = ShutdownWatchdog(0.2, lambda: ["config reload"], exit=fake_exit)
    try:
        with structlog.testing.capture_logs() as logs:
            watchdog.arm("SIGTERM")
            watchdog.arm("SIGTERM")  # a second signal changes nothing
            assert exited.wait(10)
        assert exits == [EXIT_STUCK]
        (line,) = [e for e in logs if e["event"] == "shutdown_stuck"]
        assert line["activity"] == ["config reload"]
        assert line["signal"] == "SIGTERM"
        (where,) = [t for t in line["threads"] if t.startswith("config-reader: ")]
        assert " in open" in where  # where it waits; no file name, no variable
        assert str(fifo) not in where
    finally:
        with open(fifo, "wb"):  # a writer at last: the stuck thread ends
            pass
        stuck.join(5)


def test_stuck_threads_never_show_a_variable() -> None:
    secret = "s3cr3t-value"
    found = stuck_threads()
    assert all(secret not in entry for entry in found)
