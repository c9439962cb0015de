"""What a web config tells the server: a TLS context, basic auth, extra headers."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from exporter.http.auth import BasicAuth


@dataclass(frozen=True)
class WebConfig:
    """TLS context (None = plain HTTP), auth (None = open) and headers for every answer.

    `WebConfig()` is the open, plain-HTTP configuration used without --web.config.file.
    On a request that is not `authorized()`, answer 401 with `WWW-Authenticate: Basic`
    and nothing more.
    """

    ssl_context: ssl.SSLContext | None = None
    basic_auth: BasicAuth | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: the files it was read from: the web config, and the certificate, key and CA it names
    files: tuple[Path, ...] = ()

    def authorized(self, authorization: str | None) -> bool:
        """Whether a request with this `Authorization` header value may proceed."""
        return self.basic_auth is None or self.basic_auth.check(authorization)
