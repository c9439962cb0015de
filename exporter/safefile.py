"""Reading a file that someone else controls, without ever blocking on it.

Every file the exporter reads (config, secrets, web config, TLS certificate, key
and CA, the state file) goes through `read_regular_file`: it opens with
`O_NONBLOCK` (a FIFO opens at once instead of waiting for a writer), checks the
*opened* descriptor with `fstat` (so a path swapped between a check and the open
cannot slip a FIFO or a device in), refuses anything but a regular file, and
reads no further than the cap (`/dev/zero` and a 2 GB file are refused at once).

Standard library only: the config loader, the web config and storage all use it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeFileError(OSError):
    """The file cannot be read safely; the message says what is wrong, not which file
    (the caller names it) and never any of the file's content."""


def read_regular_file(path: Path | str, max_bytes: int, *, private: bool = False) -> bytes:
    """The bytes of the regular file at `path`, of at most `max_bytes`.

    Raises `UnsafeFileError` with a short reason: not found, a directory, not a
    regular file (FIFO, device, socket), too large, permission denied, or an I/O error.
    With `private`, also a file owned by another user than this one or root, or writable
    by others (as sshd refuses such keys; group-writable is allowed, as Kubernetes'
    fsGroup makes volume files).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise UnsafeFileError("file not found") from None
    except IsADirectoryError:
        raise UnsafeFileError("is a directory, not a file") from None
    except PermissionError:
        raise UnsafeFileError("permission denied") from None
    except NotADirectoryError:
        raise UnsafeFileError("file not found (a parent is not a directory)") from None
    except OSError as exc:
        raise UnsafeFileError(f"cannot read: {exc.strerror or 'I/O error'}") from None
    except ValueError:  # an embedded NUL byte in the path
        raise UnsafeFileError("invalid file path") from None
    try:
        data = _read_opened(fd, max_bytes, private)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise UnsafeFileError(f"file too large (over {max_bytes} bytes)")
    return data


def _read_opened(fd: int, max_bytes: int, private: bool = False) -> bytes:
    """At most `max_bytes` + 1 bytes of the opened `fd`, once it is known to be a
    regular file small enough."""
    try:
        info = os.fstat(fd)
    except OSError as exc:
        raise UnsafeFileError(f"cannot read: {exc.strerror or 'I/O error'}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UnsafeFileError("is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError("not a regular file")
    if info.st_size > max_bytes:
        raise UnsafeFileError(f"file too large (over {max_bytes} bytes)")
    if private and info.st_uid not in (os.geteuid(), 0):
        raise UnsafeFileError(f"owned by another user (uid {info.st_uid}), not read")
    if private and info.st_mode & stat.S_IWOTH:
        raise UnsafeFileError("writable by others, not read")
    chunks: list[bytes] = []
    left = max_bytes + 1
    try:
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise UnsafeFileError(f"cannot read: {exc.strerror or 'I/O error'}") from None
    return b"".join(chunks)
