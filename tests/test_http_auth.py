"""The auth gate and the web-config watcher of exporter/http, without sockets: who waits
for bcrypt in which order, what a reload keeps, and a stuck look at the web config."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading

import bcrypt
import httpx
import pytest
from prometheus_client import CollectorRegistry
from support.waits import wait_until

from exporter.http import BasicAuth, ExporterApp, MetricsServer, Request, WebConfig
from exporter.http.auth import MAX_CHECKS_PER_PEER, TOO_MANY_CHECKS, AuthGate, Check
from exporter.snapshot import AccountSnapshot, SnapshotStore

PASSWORD = b"scrape-password"
HASH = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4))


def request(user: str, password: bytes, peer: str = "10.0.0.1") -> Request:
    token = base64.b64encode(user.encode() + b":" + password).decode()
    return Request("GET", "/metrics", {"authorization": f"Basic {token}"}, peer)


class Recorder:
    """bcrypt.checkpw that records each password and can hold the first call."""

    def __init__(self) -> None:
        self.passwords: list[bytes] = []
        self.release = threading.Event()
        self.release.set()
        #: released once a call has begun (in bcrypt's thread)
        self.called = threading.Semaphore(0)

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.passwords.append(password)
        self.called.release()
        self.release.wait(10)
        return bcrypt.checkpw(password, hashed)


def test_a_reload_keeps_verified_credentials_only_where_the_hash_did_not_change() -> None:
    checkpw = Recorder()
    gate = AuthGate(BasicAuth({"prom": HASH, "other": HASH}, checkpw=checkpw), nice=lambda: None)

    async def scenario() -> None:
        for user in ("prom", "other"):
            check = gate.admit(request(user, PASSWORD))
            assert isinstance(check, Check)
            assert await gate.verify(check, lambda: False)
        rehashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4))  # same password
        gate.use(BasicAuth({"prom": HASH, "other": rehashed}, checkpw=checkpw))
        assert gate.admit(request("prom", PASSWORD)) is None  # still verified: no bcrypt
        again = gate.admit(request("other", PASSWORD))
        assert isinstance(again, Check)  # its hash changed: checked again
        assert again.first  # ... ahead of unknown credentials
        assert await gate.verify(again, lambda: False)
        gate.use(BasicAuth({"prom": rehashed}, checkpw=checkpw))
        assert isinstance(gate.admit(request("prom", b"wrong")), Check)

    asyncio.run(scenario())
    assert checkpw.passwords == [PASSWORD] * 3
    gate.close()


def test_credentials_verified_before_go_ahead_of_unknown_ones() -> None:
    checkpw = Recorder()
    gate = AuthGate(BasicAuth({"prom": HASH}, checkpw=checkpw), nice=lambda: None)

    async def scenario() -> None:
        first = gate.admit(request("prom", PASSWORD))
        assert isinstance(first, Check)
        assert await gate.verify(first, lambda: False)
        # A reload re-hashed the password: the verified credentials must be checked again.
        gate.use(BasicAuth({"prom": bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4))}, checkpw=checkpw))
        checkpw.release.clear()  # the next bcrypt run holds the thread
        checks = []
        for i in range(4):
            check = gate.admit(request("prom", b"wrong-%d" % i, f"10.0.1.{i}"))
            assert isinstance(check, Check)
            checks.append(check)
        known = gate.admit(request("prom", PASSWORD, "10.0.2.1"))
        assert isinstance(known, Check)
        assert known.first
        tasks = [asyncio.ensure_future(gate.verify(c, lambda: False)) for c in checks]
        # the first call was prom's own check above; the second is the first unknown
        # credentials', in bcrypt's thread now while the rest wait
        for _ in range(2):
            await asyncio.to_thread(checkpw.called.acquire)
        tasks.append(asyncio.ensure_future(gate.verify(known, lambda: False)))
        await asyncio.sleep(0)  # a yield, no time: it takes its place in the queue
        checkpw.release.set()
        assert await asyncio.gather(*tasks) == [False] * 4 + [True]

    asyncio.run(scenario())
    # the one in bcrypt when it arrived, then the verified-before credentials, then the rest
    assert checkpw.passwords[1:3] == [b"wrong-0", PASSWORD]
    gate.close()


def test_unknown_credentials_take_turns_by_source_address() -> None:
    """A scraper restarted during a flood waits two of the flood's bcrypt runs (the one
    running, then one more: round robin), not the flood's whole queue."""
    checkpw = Recorder()
    gate = AuthGate(BasicAuth({"prom": HASH}, checkpw=checkpw), nice=lambda: None)

    async def scenario() -> None:
        checkpw.release.clear()  # the first bcrypt run holds the thread
        flood = []
        for i in range(MAX_CHECKS_PER_PEER):
            check = gate.admit(request("prom", b"wrong-%d" % i, "10.6.6.6"))
            assert isinstance(check, Check)
            flood.append(check)
        tasks = [asyncio.ensure_future(gate.verify(c, lambda: False)) for c in flood]
        await asyncio.to_thread(checkpw.called.acquire)  # wrong-0 is in bcrypt's thread
        scraper = gate.admit(request("prom", PASSWORD, "10.0.0.9"))
        assert isinstance(scraper, Check)
        assert not scraper.first  # never verified: it queues with the unknown ones
        tasks.append(asyncio.ensure_future(gate.verify(scraper, lambda: False)))
        await asyncio.sleep(0)  # a yield, no time: it takes its place in the queue
        checkpw.release.set()
        assert await asyncio.gather(*tasks) == [False] * MAX_CHECKS_PER_PEER + [True]

    asyncio.run(scenario())
    assert checkpw.passwords == [b"wrong-0", b"wrong-1", PASSWORD, b"wrong-2", b"wrong-3"]
    gate.close()


def test_unknown_credentials_are_capped_per_source_address() -> None:
    gate = AuthGate(BasicAuth({"prom": HASH}), nice=lambda: None)
    admitted = [gate.admit(request("prom", b"x%d" % i)) for i in range(MAX_CHECKS_PER_PEER)]
    assert all(isinstance(check, Check) for check in admitted)
    assert gate.admit(request("prom", b"one-more")) is TOO_MANY_CHECKS
    assert gate.refusal(request("prom", b"one-more"), hung_up=False) is TOO_MANY_CHECKS
    assert isinstance(gate.admit(request("prom", PASSWORD, "10.9.9.9")), Check)  # another
    gate.close()


@pytest.mark.slow
def test_a_stuck_look_at_the_web_config_is_reported_and_blocks_no_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SnapshotStore([AccountSnapshot("desk-a", 10.0)])
    stuck, reported = threading.Event(), threading.Event()
    looks: list[float] = []

    def source() -> WebConfig:
        looks.append(1.0)
        stuck.wait(30)  # a read that never ends
        return WebConfig()

    server = MetricsServer(
        ExporterApp(CollectorRegistry(), store),
        "127.0.0.1",
        0,
        web_source=source,
        on_stuck=reported.set,
        web_timeout=0.5,
    )
    server.start()
    try:
        wait_until(reported.is_set, timeout=10, what="the stuck look reported")
        assert len(looks) == 1  # no second look piles up behind the stuck one
        for _ in range(8):  # more than the /metrics workers: none of them is held
            response = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
            assert response.status_code == 200
    finally:
        server.close()  # while the look is stuck, as a shutdown during one would
        stuck.set()
    # The look ends after its loop has closed: nothing is handed back, nothing logged (a
    # traceback logged from the stray thread once broke another test's ast.parse).
    wait_until(
        lambda: not any(t.name.startswith("web-config") for t in threading.enumerate()),
        timeout=10,
        what="the look's thread gone",
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
