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
- The file is read once, at start; exporter-toolkit re-reads it per request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import ssl
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn

import bcrypt
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from exporter.config.errors import field_names, format_problems, problems_from_validation
from exporter.config.secrets import MAX_CONFIG_BYTES, SecretSourceError, read_small_file
from exporter.config.yamlfile import YamlError, parse_yaml

log = structlog.get_logger("exporter.webconfig")

CheckPw = Callable[[bytes, bytes], bool]
"""`bcrypt.checkpw`'s shape: (password, hashed) -> matches. Injectable for tests."""


class WebConfigError(Exception):
    """A web config file that cannot be used. str() is one line naming the field, no secrets."""


# --- the file's schema -------------------------------------------------------------------

_ClientAuthType = Literal[
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "RequireClientCert",  # exporter-toolkit's old name for RequireAnyClientCert
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
]
_TLSVersionName = Literal["TLS10", "TLS11", "TLS12", "TLS13"]

_TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

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
#: distinct wrong credentials remembered (exporter-toolkit keeps 100 verdicts)
CACHE_SIZE = 100
_BCRYPT_MAX_PASSWORD = 72  # bytes; longer passwords would be truncated, so they never match


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _TLSServerConfig(_Section):
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: _ClientAuthType | None = None
    client_ca_file: str | None = None
    client_ca: str | None = None
    min_version: _TLSVersionName | None = None
    max_version: _TLSVersionName | None = None
    prefer_server_cipher_suites: bool | None = None


class _HTTPServerConfig(_Section):
    http2: bool | None = None
    headers: dict[str, str] | None = None


class _WebConfigFile(_Section):
    tls_server_config: _TLSServerConfig | None = None
    http_server_config: _HTTPServerConfig | None = None
    basic_auth_users: dict[str, SecretStr] | None = None


# --- basic auth ----------------------------------------------------------------------------


def _parse_basic_authorization(authorization: str | None) -> tuple[str, bytes] | None:
    """(username, password) from an `Authorization: Basic ...` header value, else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    username, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return username.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class Pending:
    """Credentials the cache does not know: `BasicAuth.verify` runs bcrypt on them."""

    key: bytes = field(repr=False)
    username: str
    password: bytes = field(repr=False)


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes, caching recent verdicts.

    Verdicts are remembered as an HMAC-SHA-256 of username and password under a key
    drawn at start (never the password itself): the last verified credentials of each
    user, and, as exporter-toolkit does, the last CACHE_SIZE failures. A scrape with
    the same credentials, or a flood repeating one wrong password, costs a hash and a
    lookup, not a bcrypt run; a flood of ever new wrong passwords cannot push a
    verified user out (failures are kept apart). An unknown user costs the same bcrypt
    run as a known one (against
    the costliest configured hash), and never passes. Costs are capped at
    MAX_BCRYPT_COST when the file is loaded, so one check is bounded too.

    `verdict()` is cheap and answers from the cache or the header's shape; `verify()`
    runs bcrypt (callers bound how many run: the server, one at a time with a short
    queue). `check()` does both.
    """

    def __init__(self, users: Mapping[str, bytes], *, checkpw: CheckPw = bcrypt.checkpw) -> None:
        self._users = dict(users)
        self._checkpw = checkpw
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}
        self._failed: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        # The costliest configured hash: checking against it takes as long as a known user.
        self._decoy = max(self._users.values(), key=lambda h: int(h[4:6]), default=b"")

    def __repr__(self) -> str:
        return f"BasicAuth(users={len(self._users)})"

    def verdict(self, authorization: str | None) -> bool | Pending:
        """True or False when known without bcrypt, else the check `verify()` must run."""
        credentials = _parse_basic_authorization(authorization)
        if credentials is None:
            return False
        username, password = credentials
        if len(password) > _BCRYPT_MAX_PASSWORD:
            return False
        key = self._digest(username, password)
        known = self._known(username, key)
        return Pending(key, username, password) if known is None else known

    def _known(self, username: str, key: bytes) -> bool | None:
        with self._lock:
            verified = self._verified.get(username)
            if verified is not None and hmac.compare_digest(verified, key):
                return True
            if key in self._failed:
                self._failed.move_to_end(key)
                return False
        return None

    def verify(self, pending: Pending) -> bool:
        """Run bcrypt for `pending` (blocking) and remember the verdict."""
        known = self._known(pending.username, pending.key)  # the same may have been checked
        if known is not None:
            return known
        hashed = self._users.get(pending.username)
        try:
            matches = self._checkpw(pending.password, self._decoy if hashed is None else hashed)
        except ValueError:  # bcrypt refusing its input is a failed login, not a 500
            matches = False
        verdict = matches and hashed is not None
        with self._lock:
            if verdict:
                self._verified[pending.username] = pending.key
            else:
                self._failed[pending.key] = None
                while len(self._failed) > CACHE_SIZE:
                    self._failed.popitem(last=False)
        return verdict

    def check(self, authorization: str | None) -> bool:
        """Whether `authorization` holds a user's credentials (may run bcrypt, blocking)."""
        verdict = self.verdict(authorization)
        return self.verify(verdict) if isinstance(verdict, Pending) else verdict

    def _digest(self, username: str, password: bytes) -> bytes:
        name = username.encode("utf-8")
        message = len(name).to_bytes(4, "big") + name + password
        return hmac.new(self._cache_key, message, hashlib.sha256).digest()


# --- the result ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WebConfig:
    """What the HTTP server needs: a TLS context (None = plain HTTP), auth, extra headers.

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


#: how often the web config's files are looked at for a change (a stat each)
WEB_CONFIG_CHECK_SECONDS = 2.0


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


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return type(e).__name__


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
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _set_versions(path, context, tls)
    if tls.prefer_server_cipher_suites is False:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    _load_cert_chain(path, context, _resolve(path, tls.cert_file), _resolve(path, tls.key_file))
    has_client_ca = _load_client_ca(path, context, tls)
    mode = tls.client_auth_type or "NoClientCert"
    if mode == "NoClientCert":
        if has_client_ca:
            _fail(
                path,
                "tls_server_config.client_ca_file",
                "set, but client_auth_type does not ask for client certificates",
            )
        context.verify_mode = ssl.CERT_NONE
    elif mode == "RequestClientCert":
        context.verify_mode = ssl.CERT_NONE
    else:
        if not has_client_ca:
            _fail(
                path,
                "tls_server_config.client_ca_file",
                f"required with client_auth_type {mode}: client certificates are verified",
            )
        context.verify_mode = (
            ssl.CERT_OPTIONAL if mode == "VerifyClientCertIfGiven" else ssl.CERT_REQUIRED
        )
    return context


def _set_versions(path: Path, context: ssl.SSLContext, tls: _TLSServerConfig) -> None:
    minimum = _TLS_VERSIONS[tls.min_version or "TLS12"]
    maximum = _TLS_VERSIONS[tls.max_version or "TLS13"]
    if minimum > maximum:
        _fail(path, "tls_server_config.min_version", "is above max_version")
    with warnings.catch_warnings():  # TLS10/TLS11 are deprecated; the user asked for them
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = minimum
        context.maximum_version = maximum


def _no_passphrase() -> NoReturn:
    raise WebConfigError("encrypted")


def _load_cert_chain(path: Path, context: ssl.SSLContext, cert: Path, key: Path) -> None:
    for field_name, file in (("cert_file", cert), ("key_file", key)):
        try:
            file.read_bytes()
        except OSError as e:
            _fail(path, f"tls_server_config.{field_name}", f"cannot read {file}: {_reason(e)}")
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except WebConfigError:
        _fail(path, "tls_server_config.key_file", f"{key} is encrypted; use an unencrypted key")
    except ssl.SSLError:
        field_name, problem = _diagnose_cert_chain(cert, key)
        _fail(path, f"tls_server_config.{field_name}", problem)


def _diagnose_cert_chain(cert: Path, key: Path) -> tuple[str, str]:
    """Which of cert_file and key_file OpenSSL refused, with a reason to show."""
    try:
        x509.load_pem_x509_certificates(cert.read_bytes())
    except ValueError:
        return "cert_file", f"{cert} holds no PEM certificate"
    try:
        load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError):
        return "key_file", f"{key} holds no usable PEM private key"
    return "key_file", f"{key} does not match the certificate in {cert}"


def _load_client_ca(path: Path, context: ssl.SSLContext, tls: _TLSServerConfig) -> bool:
    if tls.client_ca_file:
        ca_file = _resolve(path, tls.client_ca_file)
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError:
            _fail(path, "tls_server_config.client_ca_file", f"{ca_file} holds no PEM certificate")
        except OSError as e:
            _fail(path, "tls_server_config.client_ca_file", f"cannot read {ca_file}: {_reason(e)}")
        return True
    if tls.client_ca:
        try:
            context.load_verify_locations(cadata=tls.client_ca)
        except (ssl.SSLError, ValueError):
            _fail(path, "tls_server_config.client_ca", "holds no PEM certificate")
        return True
    return False


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
        if int(hashed[4:6]) > MAX_BCRYPT_COST:
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
