"""Request signing for Binance USER_DATA endpoints.

The signed payload is the query string exactly as sent; the signature is
appended as the last parameter. HMAC-SHA256 signatures are hex; RSA
(PKCS#1 v1.5, SHA-256) and Ed25519 signatures are base64, then percent-encoded
in the query string.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from pydantic import SecretStr


class Signer(Protocol):
    """Turns a payload into the value of the `signature` parameter (before URL encoding)."""

    @property
    def kind(self) -> str:
        """ "hmac", "rsa" or "ed25519"."""

    def sign(self, payload: bytes) -> str: ...


@dataclass(frozen=True, repr=False)
class HmacSigner:
    secret: SecretStr
    kind: str = "hmac"

    def sign(self, payload: bytes) -> str:
        key = self.secret.get_secret_value().encode()
        return hmac.new(key, payload, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "HmacSigner(secret=**********)"


@dataclass(frozen=True, repr=False)
class RsaSigner:
    key: rsa.RSAPrivateKey
    kind: str = "rsa"

    def sign(self, payload: bytes) -> str:
        signature = self.key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode()

    def __repr__(self) -> str:
        return "RsaSigner(key=**********)"


@dataclass(frozen=True, repr=False)
class Ed25519Signer:
    key: ed25519.Ed25519PrivateKey
    kind: str = "ed25519"

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self.key.sign(payload)).decode()

    def __repr__(self) -> str:
        return "Ed25519Signer(key=**********)"


def make_signer(
    api_secret: SecretStr | None,
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | None,
) -> Signer:
    """The signer for an account's credentials: an HMAC secret or an RSA/Ed25519 key."""
    if api_secret is not None:
        return HmacSigner(api_secret)
    if isinstance(private_key, rsa.RSAPrivateKey):
        return RsaSigner(private_key)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return Ed25519Signer(private_key)
    raise ValueError("an account needs an HMAC secret or an RSA/Ed25519 private key")


def signed_query(params: list[tuple[str, str]], signer: Signer) -> str:
    """The query string to send: `params` in order, then `signature` last."""
    payload = urlencode(params)
    signature = signer.sign(payload.encode())
    return f"{payload}&signature={quote(signature, safe='')}"
