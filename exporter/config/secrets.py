"""Reading secret files and loading private keys, with safe error messages.

Every failure raises ``SecretSourceError`` whose message may name a path or a
key type but never any part of the secret itself.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from exporter.safefile import UnsafeFileError, read_regular_file

PrivateKey = RSAPrivateKey | Ed25519PrivateKey

MAX_FILE_BYTES = 64 * 1024  # keys and secrets are a few KiB at most
MAX_CONFIG_BYTES = 1024 * 1024  # the config and web config files

_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


class SecretSourceError(Exception):
    """A secret could not be read or loaded; the message is safe to show."""


def resolve_path(raw: str, base_dir: Path) -> Path:
    """A path from the config: ``~`` expanded, relative to the config's directory."""
    path = Path(raw).expanduser()
    return path if path.is_absolute() else base_dir / path


def read_secret_file(path: Path) -> bytes:
    """The bytes of a small regular file; refuses devices, FIFOs and directories."""
    try:
        return read_small_file(path, MAX_FILE_BYTES)
    except SecretSourceError as exc:
        raise SecretSourceError(f"{exc}: {os.path.abspath(path)}") from None


def read_small_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (`exporter.safefile`): a
    device (/dev/zero), a FIFO or a huge file is refused at once, never waited on. The
    error says what is wrong, not which file (the caller names it)."""
    try:
        return read_regular_file(path, max_bytes)
    except UnsafeFileError as exc:
        raise SecretSourceError(str(exc)) from None


def read_text_secret(path: Path, *, strip_all: bool) -> str:
    """A secret from a text file: trailing newlines (``strip_all``: all surrounding
    whitespace) removed; empty or non-UTF-8 files are refused."""
    data = read_secret_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretSourceError(f"not UTF-8 text: {os.path.abspath(path)}") from None
    text = text.strip() if strip_all else text.rstrip("\r\n")
    if not text:
        raise SecretSourceError(f"file is empty: {os.path.abspath(path)}")
    return text


def load_private_key(pem: bytes, passphrase: bytes | None) -> PrivateKey:
    """Load an RSA or Ed25519 private key from PEM (PKCS#8 or traditional)."""
    label_match = _PEM_LABEL.search(pem)
    if label_match is None:
        raise SecretSourceError("bad PEM: no '-----BEGIN ... PRIVATE KEY-----' block found")
    label = label_match.group(1).decode("ascii")
    if "PUBLIC KEY" in label:
        raise SecretSourceError(
            "public key given where a private key is needed "
            "(give the private key; Binance keeps the public one)"
        )
    if label == "EC PRIVATE KEY":
        raise SecretSourceError("EC key not supported (RSA or Ed25519 only)")
    if "PRIVATE KEY" not in label:
        raise SecretSourceError(f"bad PEM: expected a PRIVATE KEY block, found {label}")
    encrypted = label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in pem
    if encrypted and passphrase is None:
        raise SecretSourceError(
            "the key is encrypted: give private_key_passphrase or private_key_passphrase_file"
        )
    if not encrypted and passphrase is not None:
        raise SecretSourceError(
            "a passphrase was given but the key is not encrypted (remove the passphrase)"
        )
    try:
        key = _parse_private_key(pem, passphrase)
    except UnsupportedAlgorithm:
        raise SecretSourceError("unsupported key algorithm (RSA or Ed25519 only)") from None
    except (ValueError, TypeError):
        if encrypted:
            raise SecretSourceError("wrong passphrase (or a corrupt key)") from None
        raise SecretSourceError("bad PEM: the private key cannot be parsed") from None
    if isinstance(key, RSAPrivateKey | Ed25519PrivateKey):
        return key
    if isinstance(key, EllipticCurvePrivateKey):
        raise SecretSourceError("EC key not supported (RSA or Ed25519 only)")
    kind = type(key).__name__.removeprefix("_").removesuffix("PrivateKey") or "this"
    raise SecretSourceError(f"{kind} key not supported (RSA or Ed25519 only)")


def key_type(key: PrivateKey | None) -> str:
    """``"rsa"``, ``"ed25519"``, or ``"hmac"`` when there is no private key."""
    if key is None:
        return "hmac"
    return "rsa" if isinstance(key, RSAPrivateKey) else "ed25519"


@functools.lru_cache(maxsize=1024)
def _parse_private_key(pem: bytes, passphrase: bytes | None) -> object:
    """OpenSSL's parse of a PEM key, kept per (bytes, passphrase): checking an RSA key takes
    50-90 ms and holds the interpreter lock, so a reload of 50 unchanged RSA keys stalled
    every scrape for seconds; unchanged bytes now reuse the key loaded before (immutable)."""
    return serialization.load_pem_private_key(pem, password=passphrase)
