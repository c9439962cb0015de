"""--web.config.file: TLS, client certificates and basic auth, over real loopback HTTPS.

Certificates are made at test time. The server under test is the real exporter polling
a simulator: in-process (`exporter.serve.serve_http` with the loaded web config) for the HTTP
tests, and the command line (`python -m exporter --web.config.file ...`) for the real
Prometheus scraping it over HTTPS with basic auth and a client certificate.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from faultkit import RunningExporter, fast_config, hmac_accounts

from exporter.http import MetricsServer
from exporter.simulator import Simulator
from exporter.webconfig import CACHE_SIZE, WebConfig, WebConfigError, load_web_config

ROOT = Path(__file__).resolve().parent.parent

USER = "prometheus"
PASSWORD = "correct horse battery staple"
WRONG_PASSWORD = "Tr0ub4dor&3"
UNAUTHORIZED = "unauthorized\n"
CHALLENGE = 'Basic realm="binance-pm-exporter"'


def bcrypt_hash(password: str, *, prefix: str = "$2b$") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return prefix + hashed[4:]


HASH = bcrypt_hash(PASSWORD)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the server does not trust
    rogue_key: Path
    encrypted_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if usage is None:  # a CA
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None, key: ec.EllipticCurvePrivateKey) -> None:
    if cert is not None:
        path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test CA", ca_key, None)
    _write(d / "ca", ca, ca_key)
    signer = (ca.subject, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        "127.0.0.1",
        server_key,
        signer,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    _write(d / "server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(
        "prometheus",
        client_key,
        signer,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[x509.DNSName("prometheus")],
    )
    _write(d / "client", client, client_key)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _issue("rogue CA", rogue_ca_key, None)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _issue(
        "prometheus",
        rogue_key,
        (rogue_ca.subject, rogue_ca_key),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[x509.DNSName("prometheus")],
    )
    _write(d / "rogue", rogue, rogue_key)
    (d / "encrypted.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return PKI(
        dir=d,
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        rogue_cert=d / "rogue.crt",
        rogue_key=d / "rogue.key",
        encrypted_key=d / "encrypted.key",
    )


def web_config(tmp_path: Path, pki: PKI, **sections: Any) -> Path:
    """A web config file; `tls=` merges into a tls_server_config with the server's pair."""
    data: dict[str, Any] = {}
    if "tls" in sections:
        data["tls_server_config"] = {
            "cert_file": str(pki.server_cert),
            "key_file": str(pki.server_key),
            **sections.pop("tls"),
        }
    data.update(sections)
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def client(
    pki: PKI,
    *,
    cert: tuple[Path, Path] | None = None,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> httpx.Client:
    context = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        context.load_cert_chain(*cert)
    if min_version is not None:
        context.minimum_version = min_version
    if max_version is not None:
        context.maximum_version = max_version
    return httpx.Client(verify=context, timeout=5.0)


# --- the server under test: the real exporter, polling a simulator -------------------------


@pytest.fixture(scope="module")
def simulator() -> Iterator[tuple[Simulator, list[dict[str, str]]]]:
    sims, entries = hmac_accounts(["desk-a", "desk-b"])
    with Simulator(sims) as sim:
        yield sim, entries


def _start_exporter(
    simulator: tuple[Simulator, list[dict[str, str]]], web: WebConfig
) -> tuple[RunningExporter, MetricsServer]:
    sim, entries = simulator
    run = RunningExporter(fast_config(sim.url, entries, interval=5.0), web).start()
    assert run.server is not None
    return run, run.server


def _stop_exporter(run: RunningExporter, server: MetricsServer) -> None:
    run.close()  # stops `server` too


@pytest.fixture(scope="module")
def stopping() -> Iterator[list[threading.Thread]]:
    """Exporters stop in the background (a server's stop waits out its 0.5 s poll);
    every one has stopped by the end of the module."""
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(20)
    assert not any(t.is_alive() for t in threads)


@pytest.fixture
def exporter_server(
    simulator: tuple[Simulator, list[dict[str, str]]], stopping: list[threading.Thread]
) -> Iterator[Callable[[WebConfig], str]]:
    """Start the real exporter (polling the simulator) serving with a WebConfig;
    returns "127.0.0.1:PORT"."""
    started: list[tuple[RunningExporter, MetricsServer]] = []

    def start(web: WebConfig) -> str:
        started.append(_start_exporter(simulator, web))
        return f"127.0.0.1:{started[-1][1].port}"

    yield start
    for run, server in started:
        thread = threading.Thread(target=_stop_exporter, args=(run, server), name="stop")
        thread.start()
        stopping.append(thread)


@pytest.fixture
def serve(exporter_server: Callable[[WebConfig], str]) -> Callable[[Path], str]:
    """Start the server under test with a web config file; returns "127.0.0.1:PORT"."""

    def start(web_config_file: Path) -> str:
        return exporter_server(load_web_config(web_config_file))

    return start


# --- basic auth over HTTPS -----------------------------------------------------------------


@pytest.fixture(scope="module")
def https_basic(
    tmp_path_factory: pytest.TempPathFactory,
    pki: PKI,
    simulator: tuple[Simulator, list[dict[str, str]]],
) -> Iterator[str]:
    """One exporter for the tests below: each stop costs the HTTP server's 0.5 s poll."""
    path = web_config(tmp_path_factory.mktemp("web"), pki, tls={}, basic_auth_users={USER: HASH})
    run, server = _start_exporter(simulator, load_web_config(path))
    yield f"127.0.0.1:{server.port}"
    _stop_exporter(run, server)


def test_good_credentials_get_200(pki: PKI, https_basic: str) -> None:
    with client(pki) as c:
        r = c.get(
            f"https://{https_basic}/metrics", headers={"Authorization": basic(USER, PASSWORD)}
        )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'binance_pm_up{account="desk-a"}' in r.text


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        basic(USER, WRONG_PASSWORD),
        basic("mallory", PASSWORD),
        basic(USER, ""),
        basic(USER, PASSWORD + "x"),
        "Bearer " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(USER.encode()).decode(),  # no colon
        "Basic",
    ],
    ids=[
        "missing",
        "wrong-password",
        "unknown-user",
        "empty-password",
        "longer-password",
        "bearer",
        "bad-base64",
        "no-colon",
        "no-token",
    ],
)
def test_bad_or_missing_credentials_get_401_and_nothing_more(
    pki: PKI, https_basic: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with client(pki) as c:
        r = c.get(f"https://{https_basic}/metrics", headers=headers)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == CHALLENGE
    assert r.text == UNAUTHORIZED  # and nothing more: no metric, no hint
    assert USER not in str(r.headers)
    assert "binance_pm" not in str(r.headers)


def test_plain_http_is_refused_by_a_tls_server(https_basic: str) -> None:
    with httpx.Client(timeout=5.0) as c, pytest.raises(httpx.TransportError):
        c.get(f"http://{https_basic}/metrics")


def test_htpasswd_2y_hashes_are_accepted(tmp_path: Path, pki: PKI) -> None:
    web = load_web_config(
        web_config(tmp_path, pki, basic_auth_users={USER: bcrypt_hash(PASSWORD, prefix="$2y$")})
    )
    assert web.authorized(basic(USER, PASSWORD))
    assert not web.authorized(basic(USER, WRONG_PASSWORD))


def test_basic_auth_without_tls_is_plain_http(tmp_path: Path, pki: PKI) -> None:
    web = load_web_config(web_config(tmp_path, pki, basic_auth_users={USER: HASH}))
    assert web.ssl_context is None
    assert not web.authorized(None)


@pytest.mark.parametrize("text", ["", "{}\n", "tls_server_config:\nbasic_auth_users: {}\n"])
def test_empty_config_is_plain_and_open(tmp_path: Path, text: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(text)
    web = load_web_config(path)
    assert web.ssl_context is None
    assert web.authorized(None)
    assert WebConfig().authorized(None)


# --- the bcrypt cache ----------------------------------------------------------------------


class CountingCheckPw:
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        with self._lock:
            self.calls += 1
        return bcrypt.checkpw(password, hashed)


def test_verified_credentials_are_cached(
    tmp_path: Path, pki: PKI, exporter_server: Callable[[WebConfig], str]
) -> None:
    checkpw = CountingCheckPw()
    web = load_web_config(
        web_config(tmp_path, pki, tls={}, basic_auth_users={USER: HASH}), checkpw=checkpw
    )
    address = exporter_server(web)
    good = {"Authorization": basic(USER, PASSWORD)}
    bad = {"Authorization": basic(USER, WRONG_PASSWORD)}
    with client(pki) as c:

        def statuses(headers: dict[str, str], n: int) -> list[int]:
            return [c.get(f"https://{address}/", headers=headers).status_code for _ in range(n)]

        assert statuses(good, 5) == [200] * 5
        assert checkpw.calls == 1
        assert statuses(bad, 3) == [401] * 3
        assert checkpw.calls == 2  # a wrong password is remembered too, as exporter-toolkit does
        assert statuses(good, 1) == [200]
        assert checkpw.calls == 2


def test_a_flood_of_new_wrong_passwords_cannot_evict_a_verified_user(
    tmp_path: Path, pki: PKI
) -> None:
    checkpw = CountingCheckPw()
    web = load_web_config(web_config(tmp_path, pki, basic_auth_users={USER: HASH}), checkpw=checkpw)
    assert web.authorized(basic(USER, PASSWORD))
    for i in range(CACHE_SIZE * 2):
        assert not web.authorized(basic(USER, f"wrong-{i}"))
    calls = checkpw.calls
    assert web.authorized(basic(USER, PASSWORD))
    assert not web.authorized(basic(USER, f"wrong-{CACHE_SIZE * 2 - 1}"))  # recent: cached
    assert checkpw.calls == calls
    assert not web.authorized(basic(USER, "wrong-0"))  # long forgotten: checked again
    assert checkpw.calls == calls + 1


@pytest.mark.parametrize("cost", [15, 31])
def test_bcrypt_costs_above_the_bound_are_refused_naming_the_user(
    tmp_path: Path, pki: PKI, cost: int
) -> None:
    hashed = HASH[:4] + f"{cost:02d}" + HASH[6:]  # no need to compute a cost-31 hash
    path = web_config(tmp_path, pki, basic_auth_users={"alice": hashed})
    with pytest.raises(
        WebConfigError, match=rf"basic_auth_users\.alice: bcrypt cost {cost} is above 14"
    ):
        load_web_config(path)


def test_unknown_users_cost_a_bcrypt_run_too(tmp_path: Path, pki: PKI) -> None:
    checkpw = CountingCheckPw()
    web = load_web_config(web_config(tmp_path, pki, basic_auth_users={USER: HASH}), checkpw=checkpw)
    assert not web.authorized(basic("mallory", PASSWORD))
    assert not web.authorized(basic("mallory", PASSWORD + "2"))
    assert checkpw.calls == 2


def test_unknown_users_never_pass_even_if_the_decoy_hash_matched(tmp_path: Path, pki: PKI) -> None:
    web = load_web_config(
        web_config(tmp_path, pki, basic_auth_users={USER: HASH}), checkpw=lambda _p, _h: True
    )
    assert not web.authorized(basic("mallory", PASSWORD))
    assert web.authorized(basic(USER, "anything"))


def test_overlong_passwords_are_refused_without_bcrypt(tmp_path: Path, pki: PKI) -> None:
    checkpw = CountingCheckPw()
    web = load_web_config(web_config(tmp_path, pki, basic_auth_users={USER: HASH}), checkpw=checkpw)
    assert not web.authorized(basic(USER, PASSWORD + "x" * 80))
    assert checkpw.calls == 0


def test_cache_is_thread_safe_and_bounded(tmp_path: Path, pki: PKI) -> None:
    checkpw = CountingCheckPw()
    users = {USER: HASH, "alice": bcrypt_hash("alice-pw")}
    web = load_web_config(web_config(tmp_path, pki, basic_auth_users=users), checkpw=checkpw)
    results: list[bool] = []
    lock = threading.Lock()

    def scrape(user: str, password: str) -> None:
        for _ in range(50):
            ok = web.authorized(basic(user, password))
            with lock:
                results.append(ok)

    threads = [
        threading.Thread(target=scrape, args=(USER, PASSWORD) if i % 2 else ("alice", "alice-pw"))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert results == [True] * 400
    assert checkpw.calls <= 8  # at most one miss per thread before the cache is warm
    assert web.basic_auth is not None
    state = repr(vars(web.basic_auth))
    assert PASSWORD not in state
    assert "alice-pw" not in state


def test_no_secret_in_reprs(tmp_path: Path, pki: PKI) -> None:
    web = load_web_config(web_config(tmp_path, pki, tls={}, basic_auth_users={USER: HASH}))
    assert web.authorized(basic(USER, PASSWORD))
    for text in (repr(web), str(web), repr(web.basic_auth)):
        assert HASH not in text
        assert PASSWORD not in text


# --- client certificates -------------------------------------------------------------------


def _get(pki: PKI, address: str, cert: tuple[Path, Path] | None) -> int:
    with client(pki, cert=cert) as c:
        return c.get(f"https://{address}/metrics").status_code


@pytest.mark.parametrize(
    ("client_auth_type", "without", "good", "rogue"),
    [
        ("RequireAndVerifyClientCert", "refused", 200, "refused"),
        ("VerifyClientCertIfGiven", 200, 200, "refused"),
        ("RequireAnyClientCert", "refused", 200, "refused"),  # stricter than Go: verified too
        ("RequestClientCert", 200, 200, 200),  # not asked for, so never checked
        ("NoClientCert", 200, 200, 200),
    ],
)
def test_client_certificates(
    tmp_path: Path,
    pki: PKI,
    serve: Callable[[Path], str],
    client_auth_type: str,
    without: int | str,
    good: int | str,
    rogue: int | str,
) -> None:
    tls: dict[str, str] = {"client_auth_type": client_auth_type}
    if client_auth_type != "NoClientCert":
        tls["client_ca_file"] = str(pki.ca)
    address = serve(web_config(tmp_path, pki, tls=tls))

    def outcome(cert: tuple[Path, Path] | None) -> int | str:
        try:
            return _get(pki, address, cert)
        except httpx.TransportError:
            return "refused"

    assert outcome(None) == without
    assert outcome((pki.client_cert, pki.client_key)) == good
    assert outcome((pki.rogue_cert, pki.rogue_key)) == rogue


def test_inline_client_ca(tmp_path: Path, pki: PKI, serve: Callable[[Path], str]) -> None:
    tls = {"client_auth_type": "RequireAndVerifyClientCert", "client_ca": pki.ca.read_text()}
    address = serve(web_config(tmp_path, pki, tls=tls))
    assert _get(pki, address, (pki.client_cert, pki.client_key)) == 200
    with pytest.raises(httpx.TransportError):
        _get(pki, address, None)


# --- protocol versions ---------------------------------------------------------------------


def test_min_version_is_enforced(tmp_path: Path, pki: PKI, serve: Callable[[Path], str]) -> None:
    address = serve(web_config(tmp_path, pki, tls={"min_version": "TLS13"}))
    with client(pki, max_version=ssl.TLSVersion.TLSv1_2) as c, pytest.raises(httpx.ConnectError):
        c.get(f"https://{address}/")
    with client(pki, min_version=ssl.TLSVersion.TLSv1_3) as c:
        assert c.get(f"https://{address}/").status_code == 200


def test_max_version_is_enforced(tmp_path: Path, pki: PKI, serve: Callable[[Path], str]) -> None:
    address = serve(web_config(tmp_path, pki, tls={"max_version": "TLS12"}))
    with client(pki, min_version=ssl.TLSVersion.TLSv1_3) as c, pytest.raises(httpx.ConnectError):
        c.get(f"https://{address}/")
    with client(pki, max_version=ssl.TLSVersion.TLSv1_2) as c:
        assert c.get(f"https://{address}/").status_code == 200


def test_default_min_version_is_tls12(tmp_path: Path, pki: PKI) -> None:
    web = load_web_config(web_config(tmp_path, pki, tls={}))
    assert web.ssl_context is not None
    assert web.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert web.ssl_context.maximum_version == ssl.TLSVersion.TLSv1_3


# --- paths and headers ---------------------------------------------------------------------


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = pki.dir / "web-relative.yml"
    path.write_text(
        "tls_server_config:\n"
        "  cert_file: server.crt\n"
        "  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        "  client_ca_file: ca.crt\n"
    )
    monkeypatch.chdir(tmp_path)
    web = load_web_config(path)
    assert web.ssl_context is not None
    assert web.ssl_context.verify_mode == ssl.CERT_REQUIRED


def test_headers_are_exposed_and_sent(
    tmp_path: Path, pki: PKI, exporter_server: Callable[[WebConfig], str]
) -> None:
    headers = {
        "X-Frame-Options": "deny",
        "X-Content-Type-Options": "nosniff",
        "X-XSS-Protection": "",
    }
    web = load_web_config(
        web_config(tmp_path, pki, http_server_config={"headers": headers, "http2": False})
    )
    assert dict(web.headers) == {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}
    with httpx.Client(timeout=5.0) as c:
        r = c.get(f"http://{exporter_server(web)}/")
    assert r.headers["X-Frame-Options"] == "deny"


# --- bad configs ---------------------------------------------------------------------------

BAD_CONFIGS: list[tuple[str, str, str]] = [
    # (id, YAML with {pki} and {hash} placeholders, the field the one-line error must name)
    ("unknown-top-level", "tls_config: {{}}\n", "tls_config: unknown key"),
    (
        "unknown-tls-key",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  certfile: x\n",
        "tls_server_config.certfile: unknown key (did you mean cert_file?)",
    ),
    ("no-cert-file", "tls_server_config:\n  key_file: {pki}/server.key\n", "cert_file"),
    ("no-key-file", "tls_server_config:\n  cert_file: {pki}/server.crt\n", "key_file"),
    (
        "only-min-version",
        "tls_server_config:\n  min_version: TLS13\n",
        "tls_server_config.cert_file",
    ),
    (
        "missing-cert-file",
        "tls_server_config:\n  cert_file: {pki}/nope.crt\n  key_file: {pki}/server.key\n",
        "tls_server_config.cert_file: cannot read",
    ),
    (
        "missing-key-file",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: nope.key\n",
        "tls_server_config.key_file: cannot read",
    ),
    (
        "key-as-cert",
        "tls_server_config:\n  cert_file: {pki}/server.key\n  key_file: {pki}/server.key\n",
        "tls_server_config.cert_file",
    ),
    (
        "cert-as-key",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.crt\n",
        "tls_server_config.key_file",
    ),
    (
        "mismatched-key",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/client.key\n",
        "tls_server_config.key_file",
    ),
    (
        "encrypted-key",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/encrypted.key\n",
        "tls_server_config.key_file",
    ),
    (
        "bad-client-auth-type",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  client_auth_type: RequireAndVerify\n",
        "tls_server_config.client_auth_type",
    ),
    (
        "verify-without-ca",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n",
        "tls_server_config.client_ca_file",
    ),
    (
        "require-any-without-ca",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  client_auth_type: RequireAnyClientCert\n",
        "tls_server_config.client_ca_file",
    ),
    (
        "ca-without-client-auth",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  client_ca_file: {pki}/ca.crt\n",
        "tls_server_config.client_ca_file",
    ),
    (
        "ca-file-not-pem",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki}/ca.key\n",
        "tls_server_config.client_ca_file",
    ),
    (
        "ca-file-missing",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki}/nope.crt\n",
        "tls_server_config.client_ca_file: cannot read",
    ),
    (
        "inline-ca-not-pem",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca: nonsense\n",
        "tls_server_config.client_ca",
    ),
    (
        "bad-min-version",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  min_version: TLS9\n",
        "tls_server_config.min_version",
    ),
    (
        "bad-max-version-type",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  max_version: 13\n",
        "tls_server_config.max_version",
    ),
    (
        "min-above-max",
        "tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        "  min_version: TLS13\n  max_version: TLS12\n",
        "tls_server_config.min_version",
    ),
    (
        "inline-cert",
        "tls_server_config:\n  cert: x\n  key_file: {pki}/server.key\n",
        "tls_server_config.cert: inline certificates are not supported",
    ),
    ("inline-key", "tls_server_config:\n  key: '{hash}'\n", "tls_server_config.key"),
    (
        "cipher-suites",
        "tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
        "tls_server_config.cipher_suites: not supported",
    ),
    (
        "client-allowed-sans",
        "tls_server_config:\n  client_allowed_sans: [prometheus]\n",
        "tls_server_config.client_allowed_sans: not supported",
    ),
    ("rate-limit", "rate_limit:\n  interval: 1s\n  burst: 20\n", "rate_limit: not supported"),
    ("tls-not-a-mapping", "tls_server_config: [1]\n", "tls_server_config"),
    (
        "plaintext-password",
        "basic_auth_users:\n  prometheus: {password}\n",
        "basic_auth_users.prometheus: not a bcrypt hash",
    ),
    (
        "truncated-hash",
        "basic_auth_users:\n  prometheus: '{hash_truncated}'\n",
        "basic_auth_users.prometheus: not a bcrypt hash",
    ),
    (
        "hash-not-a-string",
        "basic_auth_users:\n  prometheus: 12345\n",
        "basic_auth_users.prometheus",
    ),
    ("users-a-list", "basic_auth_users:\n  - prometheus\n", "basic_auth_users"),
    ("user-with-colon", "basic_auth_users:\n  'a:b': '{hash}'\n", "basic_auth_users.a:b"),
    (
        "duplicate-user",
        "basic_auth_users:\n  prometheus: '{hash}'\n  prometheus: '{hash}'\n",
        "duplicate key 'prometheus'",
    ),
    (
        "yaml-syntax-error-beside-a-hash",
        "basic_auth_users:\n  prometheus: '{hash}'\n  alice: [{password}\n",
        ":4:1: YAML syntax error:",
    ),
    ("top-level-list", "- a\n", "top level"),
    ("hash-pasted-as-a-key", "'{hash}': 1\n", "$2b$...(60 characters): unknown key"),
    (
        "unknown-header",
        "http_server_config:\n  headers:\n    X-Powered-By: me\n",
        "http_server_config.headers.X-Powered-By: cannot be set",
    ),
    (
        "bad-header-value",
        "http_server_config:\n  headers:\n    X-Frame-Options: allowall\n",
        "http_server_config.headers.X-Frame-Options: must be one of",
    ),
    ("unknown-http-key", "http_server_config:\n  http3: true\n", "http_server_config.http3"),
    ("http2-not-bool", "http_server_config:\n  http2: 'yes'\n", "http_server_config.http2"),
]


@pytest.mark.parametrize(("text", "field"), [pytest.param(t, f, id=i) for i, t, f in BAD_CONFIGS])
def test_bad_config_gives_one_line_naming_the_field(
    tmp_path: Path, pki: PKI, text: str, field: str
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        text.format(pki=pki.dir, hash=HASH, hash_truncated=HASH[:-3], password=PASSWORD)
    )
    with pytest.raises(WebConfigError) as e:
        load_web_config(path)
    message = str(e.value)
    assert "\n" not in message
    assert field in message
    assert message.startswith(f"{path}:")  # then LINE:COL: for YAML errors
    for secret in (HASH, HASH[:-3], HASH[7:], PASSWORD):
        assert secret not in message
    assert e.value.__cause__ is None
    assert e.value.__suppress_context__


def test_a_password_in_place_of_a_hash_is_not_shown(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n  prometheus: 271828182845\n")
    with pytest.raises(WebConfigError) as e:
        load_web_config(path)
    assert str(e.value) == f"{path}: basic_auth_users.prometheus: must be a string (got a number)"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match=r"nope\.yml: cannot read: file not found"):
        load_web_config(tmp_path / "nope.yml")


def test_every_bad_config_is_distinct() -> None:
    assert len({i for i, _, _ in BAD_CONFIGS}) == len(BAD_CONFIGS) >= 30


# --- a real Prometheus scraping over HTTPS, basic auth and a client certificate -------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(condition: Callable[[], Any], deadline_seconds: float, what: str) -> Any:
    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            result = condition()
        except httpx.TransportError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_seconds}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], str]]:
    """Start Debian's prometheus with a config; returns its base URL. Stopped at teardown."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not on PATH (apt-get install prometheus)"
    processes: list[subprocess.Popen[bytes]] = []

    def start(config: dict[str, Any]) -> str:
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        url = f"http://127.0.0.1:{_free_port()}"
        log = (tmp_path / "prometheus.log").open("wb")
        processes.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address={url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
            )
        )
        log.close()

        def ready() -> bool:
            assert processes[-1].poll() is None, (tmp_path / "prometheus.log").read_text()
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200

        _wait_for(ready, 30, "prometheus to be ready")
        return url

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def serve_cli(
    tmp_path: Path, simulator: tuple[Simulator, list[dict[str, str]]]
) -> Iterator[Callable[[Path], str]]:
    """Run the exporter's command line with a web config, polling the simulator; returns
    "127.0.0.1:PORT". Stopped with SIGTERM at teardown, which must exit 0."""
    sim, entries = simulator
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "binance": {"base_url": sim.url, "timeout_seconds": 2},
                "prices": {"base_url": sim.url},
                "stream": {"enabled": False},  # no stream server: nothing beyond loopback
                "budget": {"min_interval_seconds": 1, "share": 1.0},
                "accounts": entries,
            }
        )
    )
    config_file.chmod(0o600)
    processes: list[subprocess.Popen[bytes]] = []

    def start(web_config_file: Path) -> str:
        address = f"127.0.0.1:{_free_port()}"
        log = (tmp_path / "exporter.log").open("wb")
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "exporter",
                    f"--config.file={config_file}",
                    f"--web.config.file={web_config_file}",
                    f"--web.listen-address={address}",
                    "--log.format=json",
                ],
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        )
        log.close()

        def listening() -> bool:
            assert processes[-1].poll() is None, (tmp_path / "exporter.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", int(address.split(":")[1])), 1).close()
            except OSError:
                return False
            return True

        _wait_for(listening, 30, "the exporter to listen")
        return address

    yield start
    for process in processes:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, (tmp_path / "exporter.log").read_text()


def test_prometheus_scrapes_over_https_with_basic_auth_and_client_cert(
    tmp_path: Path,
    pki: PKI,
    serve_cli: Callable[[Path], str],
    prometheus: Callable[[dict[str, Any]], str],
) -> None:
    target = serve_cli(
        web_config(
            tmp_path,
            pki,
            tls={"client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(pki.ca)},
            basic_auth_users={USER: HASH},
        )
    )

    def job(name: str, password: str, *, client_cert: bool = True) -> dict[str, Any]:
        tls = {"ca_file": str(pki.ca)}
        if client_cert:
            tls |= {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
        return {
            "job_name": name,
            "scheme": "https",
            "tls_config": tls,
            "basic_auth": {"username": USER, "password": password},
            "static_configs": [{"targets": [target]}],
        }

    url = prometheus(
        {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                job("good", PASSWORD),
                job("wrong_password", WRONG_PASSWORD),
                job("no_client_cert", PASSWORD, client_cert=False),
            ],
        }
    )

    def up_by_job() -> dict[str, str] | None:
        r = httpx.get(f"{url}/api/v1/query", params={"query": "up"}, timeout=2)
        results = r.json()["data"]["result"]
        up = {s["metric"]["job"]: s["value"][1] for s in results}
        return up if len(up) == 3 else None

    assert _wait_for(up_by_job, 30, "three scraped targets") == {
        "good": "1",
        "wrong_password": "0",
        "no_client_cert": "0",
    }
    targets = httpx.get(f"{url}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
    errors = {t["labels"]["job"]: t["lastError"] for t in targets}
    assert errors["good"] == ""
    assert "401" in errors["wrong_password"]
    assert errors["no_client_cert"]

    def accounts_up() -> dict[str, str] | None:
        query = {"query": 'binance_pm_up{job="good"} == 1'}
        results = httpx.get(f"{url}/api/v1/query", params=query, timeout=2).json()["data"]
        up = {s["metric"]["account"]: s["value"][1] for s in results["result"]}
        return up if len(up) == 2 else None

    # the exporter's own data came through: both accounts refreshed, as scraped over HTTPS
    assert _wait_for(accounts_up, 30, "binance_pm_up of both accounts") == {
        "desk-a": "1",
        "desk-b": "1",
    }
    for job in ("wrong_password", "no_client_cert"):
        query = {"query": f'count({{job="{job}", __name__=~"binance_pm_.*"}})'}
        empty = httpx.get(f"{url}/api/v1/query", params=query, timeout=2).json()["data"]
        assert empty["result"] == []  # refused scrapes brought nothing in
