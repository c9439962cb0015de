"""The last snapshot kept across restarts: one JSON file under `--storage.path`.

The file holds what the accounts showed (balances, account info) and how their
refreshes went (up, consecutive failures, last-success time); never a secret,
a credential or a route. Amounts are JSON numbers written with Python's
shortest round-trip repr, so a float read back is the float written.

Writes are atomic (a temporary file in the same directory, fsync, rename, fsync
of the directory) and mode 0600; the temporary files a killed write leaves are
removed at start. A file that cannot be used (missing, unreadable, empty, truncated,
not JSON, another version, over `MAX_FILE_BYTES`, not a regular file, owned by
another user or writable by others) is logged in one line and ignored: the exporter
then starts empty, as without a storage path. Accounts no longer configured are
dropped unread; a saved account that fails a check (its shape, a label value,
duplicate assets, a number out of range, a time in the future) is dropped alone: each
registered collector reads its own part back (`Collector.decode`), this module only the
refresh health. A write that fails (disk full, read-only) is logged and the exporter
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from exporter.collectors import registered
from exporter.collectors.stored import Unusable
from exporter.safefile import UnsafeFileError, read_regular_file
from exporter.snapshot import AccountSnapshot, Snapshot, SnapshotStore

log = structlog.get_logger("exporter.storage")

#: the format this version writes and reads; a file of another version is ignored
VERSION = 1
FILE_NAME = "snapshot.json"
#: a changed snapshot is written at most this often (and once more on shutdown)
WRITE_INTERVAL_SECONDS = 5.0
#: a larger state file is not read: 200 accounts x 30 assets write 2.1 MB; 16 MB (900
#: accounts x 100 assets) load in 2.2 s at a peak RSS of 146 MB, 32 MB in 4.4 s at 259 MB
MAX_FILE_BYTES = 16 * 1024 * 1024
#: a saved failure count above this is not restored (a failure a second for 30 years)
MAX_CONSECUTIVE_FAILURES = 10**9
#: a saved time further ahead of the clock than this is not restored
MAX_FUTURE_SECONDS = 86400.0


# --- the file's shape (validated on read) ---------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, allow_inf_nan=False)


class _Account(_Strict):
    """An account's record: its refresh health here; each collector's part, in its own
    shape, at its `stored_as` key or under `parts` (read by `Collector.decode`)."""

    up: bool
    consecutive_failures: int
    last_success: float | None
    #: the parts of the collectors without a key of their own, by collector name; a part of
    #: a collector not registered is not read
    parts: dict[str, Any] = {}


class _Head(_Strict):
    """The file without its accounts' contents: each is validated on its own."""

    version: int
    written_at: float
    accounts: dict[str, dict[str, Any]]


def _where(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return ".".join(str(part) for part in first["loc"]) or "(top level)"


def _in_range(when: float | None, now: float) -> bool:
    return when is None or 0 <= when <= now + MAX_FUTURE_SECONDS


def _problem(saved: _Account, now: float) -> tuple[str | None, str]:
    """What is wrong with a saved account's refresh health, and the reason to count it
    under; (None, "") when nothing is."""
    if not 0 <= saved.consecutive_failures <= MAX_CONSECUTIVE_FAILURES:
        return "consecutive_failures out of range", "out_of_range"
    if not _in_range(saved.last_success, now):
        return "a time before 1970 or in the future", "out_of_range"
    return None, ""


# --- reading ---------------------------------------------------------------------------


class StateFile:
    """`DIR/snapshot.json`: `load()` at start, `write()` after changes and at shutdown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME
        #: the last write's error (None after a success), to log only changes
        self._failure: str | None = None
        # A write in a thread may still run when the last write on shutdown starts: one at
        # a time, and never an older snapshot over a newer one.
        self._lock = threading.Lock()
        self._written = -1  # generation of the snapshot last written
        self._encoder = Encoder()
        #: saved accounts `load` dropped, by reason (binance_pm_dropped_records_total)
        self.dropped: dict[str, int] = {}

    def load(
        self, names: Collection[str], refresh_interval: float = 0.0
    ) -> dict[str, AccountSnapshot]:
        """The saved accounts among `names`, marked restored; {} when there is no usable file.

        The file is read only when it is a regular file of at most `MAX_FILE_BYTES`, owned by
        this user (or root) and not writable by others; accounts not among `names` are
        dropped before anything in them is looked at; an account whose record fails a check
        is dropped (counted in `dropped`), the others are restored."""
        self._remove_stale_temporaries()
        try:
            raw = read_regular_file(self.path, MAX_FILE_BYTES, private=True)
        except UnsafeFileError as exc:
            if not os.path.lexists(self.path):
                log.info("state_file_absent", path=str(self.path))
                return {}
            return self._ignored(str(exc))
        if not raw.strip():
            return self._ignored("empty")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, truncated
            return self._ignored("not valid JSON (truncated or corrupt)")
        del raw
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version != VERSION:
            newer = "a newer" if version > VERSION else "an older"
            return self._ignored(
                f"written by {newer} version of the format ({version}, not {VERSION})"
            )
        accounts = data.get("accounts") if isinstance(data, dict) else None
        if isinstance(accounts, dict):  # the others are never validated, nor kept
            data = {**data, "accounts": {n: a for n, a in accounts.items() if n in names}}
        try:
            head = _Head.model_validate(data)
        except ValidationError as exc:
            return self._ignored(f"unexpected content at {_where(exc)}")
        now = time.time()
        restored: dict[str, AccountSnapshot] = {}
        problems: list[str] = []
        for name, record in head.accounts.items():
            try:
                saved = _Account.model_validate(record)
            except ValidationError as exc:
                found, reason = f"unexpected content at {_where(exc)}", "malformed"
            else:
                problem, reason = _problem(saved, now)
                if problem is None:
                    try:
                        restored[name] = _snapshot(name, saved, record, refresh_interval, now)
                        continue
                    except Unusable as exc:
                        problem, reason = str(exc), exc.reason
                    except (ValueError, TypeError, KeyError) as exc:  # a collector's decode
                        problem, reason = str(exc), "malformed"
                found = problem
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
            problems.append(f"{name}: {found}")
        if problems:
            log.warning(
                "state_accounts_dropped",
                path=str(self.path),
                count=len(problems),
                problems=problems[:10],
            )
        log.info(
            "state_restored",
            path=str(self.path),
            accounts=len(restored),
            saved=len(accounts) if isinstance(accounts, dict) else 0,
            age_seconds=round(now - head.written_at, 1),
        )
        return restored

    def _remove_stale_temporaries(self) -> None:
        """Remove what a write killed half-way (SIGKILL, power loss) left behind: the
        temporary files of `_write_atomically`; only one exporter writes the directory."""
        removed = 0
        try:
            entries = list(self.directory.glob(f".{FILE_NAME}.*.tmp"))
        except OSError:
            return
        for entry in entries:
            with contextlib.suppress(OSError):
                if stat.S_ISREG(entry.lstat().st_mode):
                    entry.unlink()
                    removed += 1
        if removed:
            log.info("state_temporary_files_removed", path=str(self.directory), count=removed)

    def _ignored(self, reason: str) -> dict[str, AccountSnapshot]:
        log.warning("state_file_ignored", path=str(self.path), reason=reason)
        return {}

    # --- writing ---------------------------------------------------------------------

    def write(self, snapshot: Snapshot, now: float) -> bool:
        """Write `snapshot` atomically; log a failure (once per kind) and return False."""
        with self._lock:
            if snapshot.generation < self._written:
                return True
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                _write_atomically(self.path, self._encoder(snapshot, now))
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                if reason != self._failure:
                    log.warning("state_write_failed", path=str(self.path), reason=reason)
                self._failure = reason
                return False
            self._written = snapshot.generation
            if self._failure is not None:
                log.info("state_write_recovered", path=str(self.path))
                self._failure = None
            return True

    async def keep_written(
        self,
        store: SnapshotStore,
        *,
        interval: float = WRITE_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Write the store's snapshot whenever it changed, at most every `interval` seconds,
        until cancelled (the caller writes a last time on shutdown)."""
        written = store.current.generation
        while True:
            await sleep(interval)
            snapshot = store.current
            if snapshot.generation != written:
                # In a thread: encoding and fsync must not hold up the pollers.
                await asyncio.to_thread(self.write, snapshot, clock())
                written = snapshot.generation


class Encoder:
    """The state file's bytes for a snapshot: accounts' data and refresh health only.

    Each account's JSON is kept, keyed by the `AccountSnapshot` object it came from
    (snapshots are immutable), so a write encodes only the accounts refreshed since the
    last one: 200 accounts x 30 assets (2.1 MB) take 56 ms of CPU to encode whole, 6 ms
    when 3 accounts changed (a 5 s write interval at the default budget's pace).
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[AccountSnapshot, str]] = {}

    def __call__(self, snapshot: Snapshot, now: float) -> bytes:
        cache = {}
        parts = []
        for name, account in snapshot.accounts.items():
            if not (account.attempted or account.restored):
                continue  # nothing known yet: nothing to keep
            hit = self._cache.get(name)
            text = hit[1] if hit is not None and hit[0] is account else _dumps(_document(account))
            cache[name] = (account, text)
            parts.append(f"{_dumps(name)}:{text}")
        self._cache = cache
        head = _dumps({"version": VERSION, "written_at": now})[:-1]
        return f'{head},"accounts":{{{",".join(parts)}}}}}'.encode()


def encode(snapshot: Snapshot, now: float) -> bytes:
    """The state file's bytes for `snapshot`."""
    return Encoder()(snapshot, now)


def _document(account: AccountSnapshot) -> dict[str, Any]:
    """An account's record: its refresh health, then each registered collector's part,
    in its collector's shape (`encode`): at the record's own key (`stored_as`: balances,
    info), else under `parts`."""
    document: dict[str, Any] = {
        "up": account.up,
        "consecutive_failures": account.consecutive_failures,
        "last_success": account.last_success,
    }
    parts = {}
    for collector in registered():
        part = collector.get(account)
        encoded = None if part is None else collector.encode(part)
        if collector.stored_as is not None:
            document[collector.stored_as] = encoded
        elif encoded is not None:
            parts[collector.name] = encoded
    if parts:  # only then: a file without parts is read by earlier versions too
        document["parts"] = parts
    return document


def _dumps(value: object) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _write_atomically(path: Path, data: bytes) -> None:
    # mkstemp creates the file with mode 0600, in the target's directory (same filesystem).
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def _snapshot(
    name: str, saved: _Account, record: Mapping[str, Any], refresh_interval: float, now: float
) -> AccountSnapshot:
    """The saved account, each registered collector's part decoded by its collector
    (`decode`, which raises on what it cannot use) and its times checked (`times`)."""
    account = AccountSnapshot(
        name,
        refresh_interval,
        up=saved.up,
        restored=True,
        last_success=saved.last_success,
        consecutive_failures=saved.consecutive_failures,
    )
    for collector in registered():
        key = collector.stored_as
        where = key if key is not None else f"parts.{collector.name}"
        value = record.get(key) if key is not None else saved.parts.get(collector.name)
        if value is None:
            continue
        try:
            part = collector.decode(value)
        except Unusable as exc:
            raise Unusable(exc.reason, f"{where}: {exc}") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        if not all(_in_range(t, now) for t in collector.times(part)):
            raise Unusable("out_of_range", f"{where}: a time before 1970 or in the future")
        account = collector.put(account, part)
    return account
