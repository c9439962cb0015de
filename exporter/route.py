"""Where an account's requests go: a proxy (URL, may carry credentials) and a source address.

A `Route` is a value: accounts with equal routes share one HTTP client and one weight
budget, and the route's `label` names it in the `egress` label and in logs. The label
is unique per route yet never shows the proxy's credentials: a username can be a secret
too (some proxy services take their API token as the username), so neither part is
shown; a fingerprint of them tells routes that differ only by credentials apart (a
proxy service may pick the exit IP by them, and two routes sharing a label value would
give duplicate series).

Standard library only: the config, the client and the wiring all read it.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from functools import cache
from urllib.parse import unquote, urlsplit

#: PBKDF2 rounds of the credentials' fingerprint: a reader of /metrics who guesses a weak
#: proxy password can check each guess only this slowly (about 60 ms of CPU, once per route)
FINGERPRINT_ROUNDS = 100_000


@dataclass(frozen=True, repr=False)
class Route:
    """A proxy URL (``scheme://[user[:password]@]host[:port]``) and a local source address to
    connect from; both None is the default route. The proxy is normalised (scheme and host
    in lower case, no trailing ``/``) so that equal routes compare equal."""

    proxy: str | None = None
    source_address: str | None = None

    def __post_init__(self) -> None:
        if self.proxy is not None:
            object.__setattr__(self, "proxy", _normal_proxy(self.proxy))
        if self.source_address is not None:
            address = str(ipaddress.ip_address(self.source_address.strip()))
            object.__setattr__(self, "source_address", address)

    @property
    def label(self) -> str:
        """``default``, ``source:<ip>``, ``proxy:<scheme>://<host>[:port][#<fingerprint>]``,
        or ``source:<ip>,proxy:...``: the path a request takes, without any credential."""
        parts = []
        if self.source_address is not None:
            parts.append(f"source:{self.source_address}")
        if self.proxy is not None:
            parts.append(f"proxy:{_proxy_label(self.proxy)}")
        return ",".join(parts) or "default"

    def __repr__(self) -> str:
        return f"Route({self.label})"


DEFAULT = Route()


def _normal_proxy(proxy: str) -> str:
    parts = urlsplit(proxy.strip())
    userinfo, at, _ = parts.netloc.rpartition("@")
    return f"{parts.scheme.lower()}://{userinfo}{at}{_host_port(proxy)}"


def _host_port(proxy: str) -> str:
    parts = urlsplit(proxy)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return host if parts.port is None else f"{host}:{parts.port}"


def _proxy_label(proxy: str) -> str:
    parts = urlsplit(proxy)
    label = f"{parts.scheme}://{_host_port(proxy)}"
    if parts.username is None and parts.password is None:
        return label
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    return f"{label}#{_fingerprint(user, password, label)}"


@cache
def _fingerprint(user: str, password: str, salt: str) -> str:
    """8 hex digits of a salted PBKDF2 of the credentials: stable across restarts, distinct
    per credentials (2^-32 of a collision), and slow to test guesses against."""
    secret = f"{len(user)}:{user}:{password}".encode()
    digest = hashlib.pbkdf2_hmac("sha256", secret, salt.encode(), FINGERPRINT_ROUNDS)
    return digest[:4].hex()
