"""TLS: the server's context built from checked files, and the handshakes' bounds.

Certificate, key and CA files are read with `exporter.safefile` (regular files
only, size-capped, opened without blocking), and OpenSSL is handed the bytes that
were checked, never the path again: through an anonymous in-memory file
(`memfd_create`) read as /proc/self/fd/N, since `SSLContext.load_cert_chain`
takes paths only.

A connection costs TLS memory only once its first bytes arrive (until then it
is a socket and a timer), its handshake has a deadline of its own, shorter than
the header deadline, and at most MAX_HANDSHAKES run at once (the others wait,
still unwrapped, within their header deadline; a stalled handshake gives its place
to a waiting one after HANDSHAKE_STALE_SECONDS).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from exporter.safefile import UnsafeFileError, read_regular_file

ClientAuthType = Literal[
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "RequireClientCert",  # exporter-toolkit's old name for RequireAnyClientCert
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
]
TLSVersionName = Literal["TLS10", "TLS11", "TLS12", "TLS13"]

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

#: the largest certificate chain, key or CA bundle read
MAX_TLS_FILE_BYTES = 1024 * 1024
#: seconds a TLS handshake may take once the client's first bytes arrived
HANDSHAKE_TIMEOUT = 5.0
#: TLS handshakes in progress at once; more connections wait (unwrapped) for a turn
MAX_HANDSHAKES = 32
#: a handshake running this long gives its place to a waiting one when all are taken
HANDSHAKE_STALE_SECONDS = 1.0


class TLSError(Exception):
    """A TLS setting that cannot be used: `field` names it, str() says why (no secrets)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


@dataclass(frozen=True)
class TLSSettings:
    """A web config's `tls_server_config`, paths resolved."""

    cert_file: Path
    key_file: Path
    client_auth_type: ClientAuthType = "NoClientCert"
    client_ca_file: Path | None = None
    client_ca: str | None = None
    min_version: TLSVersionName = "TLS12"
    max_version: TLSVersionName = "TLS13"
    prefer_server_cipher_suites: bool = True


def _fail(field: str, problem: str) -> NoReturn:
    # `from None`: the OpenSSL error behind it would only add noise (or secrets).
    raise TLSError(field, problem) from None


def build_context(tls: TLSSettings) -> ssl.SSLContext:
    """The server's TLS context; raises TLSError naming the field."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    minimum, maximum = TLS_VERSIONS[tls.min_version], TLS_VERSIONS[tls.max_version]
    if minimum > maximum:
        _fail("min_version", "is above max_version")
    with warnings.catch_warnings():  # TLS10/TLS11 are deprecated; the user asked for them
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = minimum
        context.maximum_version = maximum
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    _load_cert_chain(context, tls.cert_file, tls.key_file)
    has_client_ca = _load_client_ca(context, tls)
    mode = tls.client_auth_type
    if mode == "NoClientCert":
        if has_client_ca:
            _fail(
                "client_ca_file", "set, but client_auth_type does not ask for client certificates"
            )
        context.verify_mode = ssl.CERT_NONE
    elif mode == "RequestClientCert":
        context.verify_mode = ssl.CERT_NONE
    else:
        if not has_client_ca:
            _fail(
                "client_ca_file",
                f"required with client_auth_type {mode}: client certificates are verified",
            )
        context.verify_mode = (
            ssl.CERT_OPTIONAL if mode == "VerifyClientCertIfGiven" else ssl.CERT_REQUIRED
        )
    return context


def _read(field: str, path: Path) -> bytes:
    try:
        return read_regular_file(path, MAX_TLS_FILE_BYTES)
    except UnsafeFileError as exc:
        _fail(field, f"cannot read {path}: {exc}")


@contextlib.contextmanager
def _as_path(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds exactly `data`, readable by this process only."""
    try:
        fd = os.memfd_create("tls", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="tls-") as handle:  # mode 0600
        handle.write(data)
        handle.flush()
        yield handle.name


def _no_passphrase() -> NoReturn:
    raise TLSError("key_file", "encrypted")


def _load_cert_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    cert, key = _read("cert_file", cert_file), _read("key_file", key_file)
    try:
        with _as_path(cert) as cert_path, _as_path(key) as key_path:
            context.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except TLSError:
        _fail("key_file", f"{key_file} is encrypted; use an unencrypted key")
    except (ssl.SSLError, OSError):
        _fail(*_diagnose_cert_chain(cert_file, cert, key_file, key))


def _diagnose_cert_chain(
    cert_file: Path, cert: bytes, key_file: Path, key: bytes
) -> tuple[str, str]:
    """Which of cert_file and key_file OpenSSL refused, with a reason to show."""
    try:
        x509.load_pem_x509_certificates(cert)
    except ValueError:
        return "cert_file", f"{cert_file} holds no PEM certificate"
    try:
        load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        return "key_file", f"{key_file} holds no usable PEM private key"
    return "key_file", f"{key_file} does not match the certificate in {cert_file}"


def _load_client_ca(context: ssl.SSLContext, tls: TLSSettings) -> bool:
    if tls.client_ca_file is not None:
        data = _read("client_ca_file", tls.client_ca_file)
        try:
            context.load_verify_locations(cadata=data.decode("ascii"))
        except (ssl.SSLError, ValueError, UnicodeDecodeError):
            _fail("client_ca_file", f"{tls.client_ca_file} holds no PEM certificate")
        return True
    if tls.client_ca:
        try:
            context.load_verify_locations(cadata=tls.client_ca)
        except (ssl.SSLError, ValueError):
            _fail("client_ca", "holds no PEM certificate")
        return True
    return False
