"""Who may call the simulated API: API keys, timestamps, recvWindow and signatures.

Written on its own on purpose, never importing the exporter's signing code: if
both sides shared it, a bug in it would pass every test. The rules are
Binance's (see shared/binance-pm-api.md): the signature is the last query
parameter and signs the exact query string before `&signature=`; HMAC-SHA256 as
hex, RSA PKCS#1 v1.5 SHA-256 and Ed25519 as base64 (percent-encoded in the query).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac as hmac_lib
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

KeyType = Literal["hmac", "rsa", "ed25519"]
PublicKey = RSAPublicKey | Ed25519PublicKey

RECV_WINDOW_DEFAULT_MS = 5_000
RECV_WINDOW_MAX_MS = 60_000
MAX_AHEAD_MS = 1_000  # a timestamp this far ahead of the server's clock is refused

_LONG = re.compile(r"[0-9]{1,20}")


class ApiError(Exception):
    """A Binance error answer: HTTP status and `{"code": ..., "msg": ...}`."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(f"{status} {code} {msg}")
        self.status = status
        self.code = code
        self.msg = msg


@dataclass(frozen=True)
class SimAccount:
    """An account the simulator knows, with what it needs to check signatures.

    HMAC accounts hold the shared secret; RSA and Ed25519 accounts hold only the
    public key, as Binance does.
    """

    name: str
    api_key: str = field(repr=False)
    key_type: KeyType
    secret: bytes | None = field(default=None, repr=False)
    public_key: PublicKey | None = field(default=None, repr=False)

    @classmethod
    def hmac(cls, name: str, api_key: str, secret: str) -> SimAccount:
        return cls(name, api_key, "hmac", secret=secret.encode())

    @classmethod
    def rsa(cls, name: str, api_key: str, public_key_pem: bytes) -> SimAccount:
        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, RSAPublicKey):
            raise TypeError(f"account {name}: not an RSA public key")
        return cls(name, api_key, "rsa", public_key=key)

    @classmethod
    def ed25519(cls, name: str, api_key: str, public_key_pem: bytes) -> SimAccount:
        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(f"account {name}: not an Ed25519 public key")
        return cls(name, api_key, "ed25519", public_key=key)

    def verify(self, payload: str, signature: str) -> bool:
        """True when `signature` (as decoded from the query) signs `payload`."""
        data = payload.encode()
        if self.secret is not None:
            expected = hmac_lib.new(self.secret, data, hashlib.sha256).hexdigest()
            return hmac_lib.compare_digest(expected.encode(), signature.encode())
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            return False
        try:
            if isinstance(self.public_key, RSAPublicKey):
                self.public_key.verify(raw, data, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(self.public_key, Ed25519PublicKey):
                self.public_key.verify(raw, data)
            else:
                return False
        except InvalidSignature:
            return False
        return True


def require_account(api_key: str | None, account: SimAccount | None) -> SimAccount:
    """The account named by the X-MBX-APIKEY header (`account` is its lookup)."""
    if not api_key:
        raise ApiError(401, -2014, "API-key format invalid.")
    if account is None:
        raise ApiError(401, -2015, "Invalid API-key, IP, or permissions for action.")
    return account


def check_signed_query(account: SimAccount, query: str, now_ms: int) -> dict[str, str]:
    """Check a USER_DATA request's query; return its parameters (without the signature)."""
    pairs = parse_qsl(query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    if "signature" not in names:
        raise _mandatory("signature")
    if len(set(names)) != len(names):
        raise ApiError(400, -1101, "Duplicate values for a parameter detected.")
    if names[-1] != "signature":
        raise _bad_signature()
    params = dict(pairs)
    signature = params.pop("signature")

    timestamp = _long_param(params, "timestamp")
    if timestamp is None:
        raise _mandatory("timestamp")
    recv_window = _long_param(params, "recvWindow")
    if recv_window is None:
        recv_window = RECV_WINDOW_DEFAULT_MS
    if recv_window > RECV_WINDOW_MAX_MS:
        raise ApiError(400, -1131, f"recvWindow must be less than {RECV_WINDOW_MAX_MS}.")
    if timestamp >= now_ms + MAX_AHEAD_MS:
        raise ApiError(
            400,
            -1021,
            f"Timestamp for this request was {MAX_AHEAD_MS}ms ahead of the server's time.",
        )
    if now_ms - timestamp > recv_window:
        raise ApiError(400, -1021, "Timestamp for this request is outside of the recvWindow.")

    marker = query.rfind("&signature=")
    if marker < 0 and not query.startswith("signature="):
        raise _bad_signature()  # "signature" arrived percent-encoded: not Binance's format
    payload = query[:marker] if marker >= 0 else ""
    if not account.verify(payload, signature):
        raise _bad_signature()
    return params


def _long_param(params: dict[str, str], name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not _LONG.fullmatch(value):
        raise ApiError(
            400,
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.",
        )
    return int(value)


def _mandatory(name: str) -> ApiError:
    return ApiError(
        400, -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
    )


def _bad_signature() -> ApiError:
    return ApiError(400, -1022, "Signature for this request is not valid.")
