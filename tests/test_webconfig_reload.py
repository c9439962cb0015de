"""The web config is re-read when it changes, as exporter-toolkit's is: a rotated
certificate reaches new TLS connections within seconds, open connections keep theirs,
and a broken new web config keeps the last good one (and says so in a metric)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.harness import RunningExporter, accounts, sim_config
from support.waits import wait_until
from test_webconfig import _issue

from exporter.simulator import Simulator
from exporter.webconfig import WebConfigFile

pytestmark = pytest.mark.slow

SUCCESSFUL = "binance_pm_web_config_last_reload_successful"


def write_pair(directory: Path, common_name: str) -> None:
    """A self-signed server certificate and its key as server.crt and server.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(common_name, key, None, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    # written beside, then renamed over: as cert-manager's secret volume swaps them
    for name, data in (
        (
            "server.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
        ("server.crt", cert.public_bytes(serialization.Encoding.PEM)),
    ):
        (directory / f"{name}.new").write_bytes(data)
        (directory / f"{name}.new").replace(directory / name)


def served_name(port: int) -> str:
    """The common name of the certificate a new TLS connection to the exporter sees."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value)


def test_a_rotated_certificate_reaches_new_connections_and_spares_open_ones(
    tmp_path: Path,
) -> None:
    write_pair(tmp_path, "first")
    web_config = tmp_path / "web.yml"
    tls = {"cert_file": "server.crt", "key_file": "server.key"}
    web_config.write_text(yaml.safe_dump({"tls_server_config": tls}))
    generated = accounts(1)
    with Simulator([g.sim_account for g in generated]) as sim:
        config = sim_config(sim.url, generated)
        with RunningExporter(config, WebConfigFile(web_config)) as running:
            assert running.server is not None
            port = running.server.port
            assert served_name(port) == "first"
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            held = context.wrap_socket(raw)  # opened before the rotation
            try:
                write_pair(tmp_path, "second")
                wait_until(lambda: served_name(port) == "second", 15, "the new certificate")
                held.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert held.recv(4096).startswith(b"HTTP/1.1 200")
            finally:
                held.close()

            metrics = _metrics(port)
            assert f"{SUCCESSFUL} 1.0" in metrics
            # a broken new version: the last good one stays in use, and the metric says so
            web_config.write_text("tls_server_config: {cert_file: nowhere.crt, key_file: x}\n")
            wait_until(lambda: f"{SUCCESSFUL} 0.0" in _metrics(port), 15, "the failed reload")
            assert served_name(port) == "second"


def _metrics(port: int) -> str:
    return httpx.get(f"https://127.0.0.1:{port}/metrics", verify=False, timeout=5).text
