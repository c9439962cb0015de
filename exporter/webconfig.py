"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit format.

The file format is the one node_exporter and the other official exporters read
(prometheus/exporter-toolkit, docs/web-configuration.md)::

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
      min_version: TLS12             # TLS10 | TLS11 | TLS12 (default) | TLS13
      max_version: TLS13             # default
    http_server_config:
      headers: {X-Content-Type-Options: nosniff}
    basic_auth_users:
      alice: $2y$10$...              # bcrypt hash, e.g. from `htpasswd -nBC 10 "" | tr -d ':\\n'`

Unknown keys are an error, as in exporter-toolkit. Where this implementation
differs from the Go one it says so with an error rather than silently:

- `client_auth_type` maps onto Python's `ssl` verify modes. Python cannot ask for
  a client certificate without verifying it, so:
  NoClientCert -> CERT_NONE; RequestClientCert -> CERT_NONE (nothing here reads an
  unverified certificate, so not asking for one changes only the handshake);
  RequireAnyClientCert (and its old name RequireClientCert) -> CERT_REQUIRED, which
  also verifies the certificate and therefore needs a client CA (stricter than Go);
  VerifyClientCertIfGiven -> CERT_OPTIONAL; RequireAndVerifyClientCert -> CERT_REQUIRED.
  Verifying modes need `client_ca_file` or `client_ca`: Go would fall back to the
  system roots, which would admit a certificate from any public CA.
- TLS10 and TLS11 are accepted, but Debian's OpenSSL (security level 2) refuses
  those protocol versions in the handshake anyway.
- A `tls_server_config` that sets anything needs `cert_file` and `key_file`
  (exporter-toolkit would silently serve plain HTTP without them).
- Not supported, each rejected by name: inline `cert`/`key` (Python's ssl loads
  certificate chains from files only), `cipher_suites` and `curve_preferences`
  (Go names), `client_allowed_sans`, `rate_limit`.
- `http_server_config.headers` is accepted and validated as exporter-toolkit does
  (same header names, same allowed values) and exposed as `WebConfig.headers` for
  the HTTP server to add to every response. `http2` is accepted and ignored: the
  server speaks HTTP/1.1 only.
- The file, and the files it names, are read again when one of them changes
  (`WebConfigFile`); exporter-toolkit re-reads it per request.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import bcrypt
import structlog
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from exporter.config.errors import field_names, format_problems, problems_from_validation
from exporter.config.secrets import MAX_CONFIG_BYTES, SecretSourceError, read_small_file
from exporter.config.yamlfile import YamlError, parse_yaml
from exporter.http import (
    CACHE_SIZE,
    BasicAuth,
    CheckPw,
    ClientAuthType,
    TLSError,
    TLSSettings,
    TLSVersionName,
    WebConfig,
    bcrypt_cost,
    build_context,
)

__all__ = ["CACHE_SIZE", "WebConfig", "WebConfigError", "WebConfigFile", "load_web_config"]

log = structlog.get_logger("exporter.webconfig")


class WebConfigError(Exception):
    """A web config file that cannot be used. str() is one line naming the field, no secrets."""


# --- the file's schema -------------------------------------------------------------------

# Keys exporter-toolkit knows that this implementation does not support.
_UNSUPPORTED: dict[tuple[str, ...], str] = {
    ("tls_server_config", "cert"): "inline certificates are not supported; use cert_file",
    ("tls_server_config", "key"): "inline keys are not supported; use key_file",
    ("tls_server_config", "cipher_suites"): "not supported; OpenSSL's defaults are used",
    ("tls_server_config", "curve_preferences"): "not supported; OpenSSL's defaults are used",
    ("tls_server_config", "client_allowed_sans"): "not supported",
    ("rate_limit",): "not supported",
}

# Response headers exporter-toolkit lets a web config set, with their allowed values
# (empty tuple: any value).
_ALLOWED_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}

_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
#: the highest bcrypt cost accepted: ~1 s per check on a 2024 server core (each step doubles)
MAX_BCRYPT_COST = 14


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _TLSServerConfig(_Section):
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: ClientAuthType | None = None
    client_ca_file: str | None = None
    client_ca: str | None = None
    min_version: TLSVersionName | None = None
    max_version: TLSVersionName | None = None
    prefer_server_cipher_suites: bool | None = None


class _HTTPServerConfig(_Section):
    http2: bool | None = None
    headers: dict[str, str] | None = None


class _WebConfigFile(_Section):
    tls_server_config: _TLSServerConfig | None = None
    http_server_config: _HTTPServerConfig | None = None
    basic_auth_users: dict[str, SecretStr] | None = None


# --- loading -------------------------------------------------------------------------------


#: the keys a message may show whole
_FIELD_NAMES = field_names(_WebConfigFile)


def load_web_config(path: Path, *, checkpw: CheckPw = bcrypt.checkpw) -> WebConfig:
    """Read and check a web config file; build the TLS context and the basic-auth checker.

    Raises WebConfigError with one line naming the field. `checkpw` is bcrypt's, or a
    stand-in for tests.
    """
    try:
        text = read_small_file(path, MAX_CONFIG_BYTES)
    except SecretSourceError as e:
        raise WebConfigError(f"{path}: cannot read: {e}") from None
    try:
        raw = parse_yaml(text, _FIELD_NAMES)
    except YamlError as e:
        raise WebConfigError(f"{path}:{e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{path}: the top level must be a mapping") from None
    _reject_unsupported(path, raw)
    try:
        parsed = _WebConfigFile.model_validate(raw)
    except ValidationError as e:
        problems = format_problems(problems_from_validation(e, _WebConfigFile), _FIELD_NAMES)
        raise WebConfigError(f"{path}: {'; '.join(problems)}") from None
    tls = parsed.tls_server_config
    named = (tls.cert_file, tls.key_file, tls.client_ca_file) if tls is not None else ()
    return WebConfig(
        ssl_context=_ssl_context(path, tls),
        basic_auth=_basic_auth(path, parsed.basic_auth_users, checkpw),
        headers=_headers(path, parsed.http_server_config),
        files=(path, *(_resolve(path, name) for name in named if name)),
    )


class WebConfigFile:
    """A `--web.config.file` kept current, as exporter-toolkit does: when the file, or a
    certificate, key or CA file it names, changes, `check()` loads it again, and new
    connections use it (open ones keep theirs). A broken new version keeps the last good
    one, logged once per change (`successful` False until a good one is loaded)."""

    #: whether the last load (at start, or after a change) worked
    successful: bool
    #: when the web config in use was loaded (epoch seconds)
    last_success: float

    def __init__(
        self,
        path: Path,
        *,
        checkpw: CheckPw = bcrypt.checkpw,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._checkpw = checkpw
        self._clock = clock
        #: raises WebConfigError at start: a broken web config is a usage error there
        self.current = load_web_config(path, checkpw=checkpw)
        self._stamp = _stamp(self.current.files)
        self.successful = True
        self.last_success = clock()

    def check(self) -> WebConfig:
        """The web config to use now: reloaded if any of its files changed since."""
        stamp = _stamp(self.current.files)
        if stamp == self._stamp:
            return self.current
        self._stamp = stamp  # a broken version is reported once, not at every check
        try:
            loaded = load_web_config(self.path, checkpw=self._checkpw)
        except WebConfigError as exc:
            self.successful = False
            log.error("web_config_reload_failed", error=str(exc))  # noqa: TRY400 - one line
            return self.current
        self.current, self._stamp = loaded, _stamp(loaded.files)
        self.successful, self.last_success = True, self._clock()
        log.info("web_config_reloaded", tls=loaded.ssl_context is not None)
        return loaded

    def stuck(self) -> None:
        """A look at the files did not end in time (the server logs it): a failed reload."""
        self.successful = False


def _stamp(files: tuple[Path, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    """What tells a file's change: its inode, size and modification time (None: gone)."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _fail(path: Path, field_name: str, problem: str) -> NoReturn:
    # `from None`: the OpenSSL or pydantic error behind it would only add noise (or secrets).
    raise WebConfigError(f"{path}: {field_name}: {problem}") from None


def _reject_unsupported(path: Path, raw: dict[Any, Any]) -> None:
    for keys, problem in _UNSUPPORTED.items():
        section: object = raw
        for key in keys[:-1]:
            section = section.get(key) if isinstance(section, dict) else None
        if isinstance(section, dict) and keys[-1] in section:
            _fail(path, ".".join(keys), problem)


def _resolve(path: Path, filename: str) -> Path:
    candidate = Path(filename)
    return candidate if candidate.is_absolute() else path.parent / candidate


def _ssl_context(path: Path, tls: _TLSServerConfig | None) -> ssl.SSLContext | None:
    if tls is None or not tls.model_fields_set:
        return None
    if not tls.cert_file:
        _fail(path, "tls_server_config.cert_file", "required when tls_server_config is set")
    if not tls.key_file:
        _fail(path, "tls_server_config.key_file", "required when tls_server_config is set")
    settings = TLSSettings(
        cert_file=_resolve(path, tls.cert_file),
        key_file=_resolve(path, tls.key_file),
        client_auth_type=tls.client_auth_type or "NoClientCert",
        client_ca_file=_resolve(path, tls.client_ca_file) if tls.client_ca_file else None,
        client_ca=tls.client_ca,
        min_version=tls.min_version or "TLS12",
        max_version=tls.max_version or "TLS13",
        prefer_server_cipher_suites=tls.prefer_server_cipher_suites is not False,
    )
    try:
        return build_context(settings)
    except TLSError as e:
        _fail(path, f"tls_server_config.{e.field}", str(e))


def _basic_auth(
    path: Path, users: Mapping[str, SecretStr] | None, checkpw: CheckPw
) -> BasicAuth | None:
    if not users:
        return None
    hashes: dict[str, bytes] = {}
    for username, secret in users.items():
        where = f"basic_auth_users.{username}"
        if ":" in username:
            _fail(path, where, "a username cannot contain ':'")
        hashed = secret.get_secret_value()
        if not _BCRYPT_HASH.fullmatch(hashed):
            _fail(path, where, "not a bcrypt hash ($2a$, $2b$ or $2y$, cost 04-31)")
        if bcrypt_cost(hashed.encode()) > MAX_BCRYPT_COST:
            _fail(
                path,
                where,
                f"bcrypt cost {hashed[4:6]} is above {MAX_BCRYPT_COST}: every check would take "
                "seconds; hash it again with a lower cost (e.g. htpasswd -nBC 10)",
            )
        hashes[username] = hashed.encode("ascii")
    return BasicAuth(hashes, checkpw=checkpw)


def _headers(path: Path, http: _HTTPServerConfig | None) -> Mapping[str, str]:
    headers: dict[str, str] = {}
    for name, value in ((http.headers or {}) if http else {}).items():
        allowed = _ALLOWED_HEADERS.get(name)
        if allowed is None:
            _fail(
                path,
                f"http_server_config.headers.{name}",
                f"cannot be set; allowed: {', '.join(_ALLOWED_HEADERS)}",
            )
        if allowed and value and value not in allowed:
            _fail(path, f"http_server_config.headers.{name}", f"must be one of {list(allowed)}")
        if value:  # blank means unset
            headers[name] = value
    return MappingProxyType(headers)
