"""Known secrets never show: not in logs, /metrics, /readyz, errors, or --check-config.

Three accounts, one per key type (HMAC; RSA and Ed25519 private keys encrypted with a
passphrase), are polled by the real exporter while a representative part of the fault
matrix runs on them. Every form a secret could leak in is searched for: the value itself,
hex, base64, a 16-character head or tail, the keys' DER and private numbers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from faultkit import RunningExporter, captured_logs, secret_forms, wait_until

from exporter.app import Exporter
from exporter.binance import errors
from exporter.binance.client import BinanceClient, Credentials
from exporter.binance.signing import make_signer
from exporter.config import Config, ConfigError, load_config
from exporter.serve import serve_http
from exporter.simulator import SimAccount, Simulator
from exporter.summary import summarize

ROOT = Path(__file__).resolve().parent.parent
BALANCE = "/papi/v1/balance"


@dataclass(frozen=True)
class Secrets:
    config_file: Path
    environ: dict[str, str]
    sim_accounts: list[SimAccount]
    forms: list[str]  # every string that must never be shown


def _key_forms(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> list[str]:
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    # the DER's head is a fixed ASN.1 prefix, not a secret: only whole and tail forms
    forms = [f for f in secret_forms(der) if len(f) > 16] + [pem.splitlines()[-2]]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        forms += secret_forms(raw)
    else:
        numbers = key.private_numbers()
        for n in (numbers.d, numbers.p, numbers.q):
            forms += [str(n), f"{n:x}", str(n)[:24]]
            forms += secret_forms(n.to_bytes((n.bit_length() + 7) // 8, "big"))
    return forms


def _encrypted_pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, passphrase: str) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    ).decode()


def _public_pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_secrets(directory: Path, base_url: str) -> Secrets:
    hmac_key, hmac_secret = "hk" + secrets.token_urlsafe(30), secrets.token_urlsafe(40)
    rsa_key_id, ed_key_id = "rk" + secrets.token_urlsafe(30), "ek" + secrets.token_urlsafe(30)
    rsa_pass, ed_pass = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    files = {
        "hmac.secret": hmac_secret + "\n",
        "rsa.key.id": rsa_key_id + "\n",
        "rsa.pem": _encrypted_pem(rsa_key, rsa_pass),
        "rsa.pass": rsa_pass + "\n",
        "ed.pem": _encrypted_pem(ed_key, ed_pass),
    }
    for name, text in files.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o600)
    config = {
        "binance": {"base_url": base_url, "timeout_seconds": 1},
        "stream": {"enabled": False},  # no stream server: nothing beyond loopback
        "prices": {"base_url": base_url},
        "budget": {
            "ip_weight_limit_per_minute": 100_000,
            "share": 1.0,
            "ip_high_water": 0.9,
            "min_interval_seconds": 1,
        },
        "accounts": [
            {"name": "hmac", "api_key": "${HMAC_KEY}", "api_secret_file": "hmac.secret"},
            {
                "name": "rsa",
                "api_key_file": "rsa.key.id",
                "private_key_file": "rsa.pem",
                "private_key_passphrase_file": "rsa.pass",
            },
            {
                "name": "ed",
                "api_key": ed_key_id,
                "private_key_file": "ed.pem",
                "private_key_passphrase": "${ED_PASS}",
            },
        ],
    }
    config_file = directory / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    forms = []
    for text in (hmac_key, hmac_secret, rsa_key_id, ed_key_id, rsa_pass, ed_pass):
        forms += secret_forms(text)
    for pem in (files["rsa.pem"], files["ed.pem"]):
        forms += [line for line in pem.splitlines()[1:-1] if len(line) >= 16]
    forms += _key_forms(rsa_key) + _key_forms(ed_key)
    return Secrets(
        config_file=config_file,
        environ={"HMAC_KEY": hmac_key, "ED_PASS": ed_pass},
        sim_accounts=[
            SimAccount.hmac("hmac", hmac_key, hmac_secret),
            SimAccount.rsa("rsa", rsa_key_id, _public_pem(rsa_key)),
            SimAccount.ed25519("ed", ed_key_id, _public_pem(ed_key)),
        ],
        forms=forms,
    )


def assert_no_secret(text: str, found_in: str, forms: list[str]) -> None:
    leaked = sum(form in text for form in forms)  # a count: a failure must not print them
    assert leaked == 0, f"{leaked} secret form(s) in {found_in}"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Secrets, Simulator, Config]]:
    known = make_secrets(tmp_path, "http://127.0.0.1:1")
    with Simulator(known.sim_accounts, ip_weight_limit=10**6) as simulator:
        text = known.config_file.read_text().replace("http://127.0.0.1:1", simulator.url)
        known.config_file.write_text(text)
        yield known, simulator, load_config(known.config_file, known.environ)


# --- the exporter under faults ---------------------------------------------------------------

FAULTS = {
    "hmac": [
        {"kind": "reset"},
        {"kind": "status", "status": 500},
        {"kind": "api_error", "code": -1022, "msg": "Signature for this request is not valid."},
    ],
    "rsa": [
        {"kind": "latency", "seconds": 1.5},
        {"kind": "malformed_json"},
        {"kind": "rate_limit", "retry_after": 1},
    ],
    "ed": [
        {"kind": "stall", "seconds": 1.5},
        {"kind": "raw", "body": '[{"asset":"USDT","totalWalletBalance":"NaN"}]'},
        {"kind": "api_error", "status": 401, "code": -2015, "msg": "Invalid API-key."},
    ],
}


def test_no_secret_in_logs_metrics_readyz_under_faults(
    setup: tuple[Secrets, Simulator, Config],
    caplog: pytest.LogCaptureFixture,
) -> None:
    known, simulator, config = setup
    caplog.set_level(logging.DEBUG)  # httpx and httpcore too
    bodies: list[tuple[str, str]] = []
    # an auth error waits out the backoff cap: 1.5 s here, not 300 s
    with captured_logs() as logs, RunningExporter(config, backoff_cap=1.5) as run:
        server = serve_http(run.exporter, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.port}"
        try:
            wait_until(run.all_up, 10, "every account up")
            injected = time.time()
            for account, faults in FAULTS.items():
                for spec in faults:
                    simulator.inject_fault(**spec, account=account, count=1, endpoint=BALANCE)
            simulator.clock_offset_ms = -3000  # and a -1021 on top

            def recovered() -> bool:
                for path in ("/metrics", "/readyz", "/"):
                    response = httpx.get(base + path, timeout=5)
                    bodies.append((path, response.text))
                after = [r for r in simulator.requests if r.time > injected and r.path == BALANCE]
                by_account = [[r for r in after if r.account == name] for name in FAULTS]
                return (
                    run.all_up()
                    and all(
                        len(tries) > len(FAULTS[tries[0].account]) and tries[-1].status == 200
                        for tries in by_account
                        if tries
                    )
                    and all(by_account)
                )

            wait_until(recovered, 20, "every account through its faults and back up")
        finally:
            server.close()
    rejected = [r for r in simulator.requests if r.status == 400]
    assert rejected  # the -1021s happened, and the faults did
    outcomes = {e.get("outcome") for e in logs.events("poll_failed")}
    assert {"connection_error", "server_error", "auth_error", "timeout"} <= outcomes
    assert {"invalid_response", "rate_limited"} <= outcomes
    assert len(logs.lines) > 20
    for i, line in enumerate(logs.lines):
        assert_no_secret(line, f"log line {i}", known.forms)
    for record in caplog.records:
        assert_no_secret(record.getMessage(), f"{record.name} log record", known.forms)
    assert {path for path, _ in bodies} == {"/metrics", "/readyz", "/"}
    for path, body in bodies:
        assert_no_secret(body, path, known.forms)


def test_no_secret_in_errors_raised_by_the_client(
    setup: tuple[Secrets, Simulator, Config],
) -> None:
    known, simulator, config = setup
    faults = [spec for specs in FAULTS.values() for spec in specs] + [
        {"kind": "api_error", "code": -1021, "msg": "Timestamp outside of the recvWindow."},
        {"kind": "ban", "until_ms": int(time.time() * 1000) + 60_000},
    ]
    texts: list[str] = []

    async def collect() -> None:
        client = BinanceClient(
            base_url=config.binance.base_url, timeout_seconds=0.5, recv_window_ms=5000
        )
        try:
            for account in config.accounts:
                creds = Credentials(
                    account.api_key, make_signer(account.api_secret, account.private_key)
                )
                texts.extend([repr(creds), str(creds)])
                for spec in faults:
                    simulator.inject_fault(**spec, account=account.name, count=1)
                    try:
                        await client.balance(creds)
                    except errors.BinanceError as exc:
                        texts.extend([str(exc), repr(exc), *traceback.format_exception(exc)])
                    else:
                        raise AssertionError(f"{spec['kind']} raised nothing")
        finally:
            await client.aclose()

    asyncio.run(collect())
    assert len(texts) >= 3 * len(faults) * 3
    for i, text in enumerate(texts):
        assert_no_secret(text, f"error text {i}", known.forms)


def test_no_secret_in_config_reprs_and_summary(setup: tuple[Secrets, Simulator, Config]) -> None:
    known, _, config = setup
    texts = [repr(config), str(config), config.model_dump_json(), summarize(config)]
    texts += [repr(a) for a in config.accounts] + [str(a.model_dump()) for a in config.accounts]
    exporter = Exporter(config)
    texts += [repr(p.client) for p in exporter.pollers]
    for i, text in enumerate(texts):
        assert_no_secret(text, f"text {i}", known.forms)


def test_no_secret_in_config_errors(tmp_path: Path) -> None:
    known = make_secrets(tmp_path, "http://127.0.0.1:1")
    (tmp_path / "rsa.pass").write_text("not-the-passphrase\n")  # wrong passphrase
    environ = {"HMAC_KEY": known.environ["HMAC_KEY"], "ED_PASS": "wrong-too"}
    with pytest.raises(ConfigError) as caught:
        load_config(known.config_file, environ)
    assert "passphrase" in str(caught.value)
    for text in (str(caught.value), repr(caught.value), *traceback.format_exception(caught.value)):
        assert_no_secret(text, "the config error", known.forms)


def _cli(config_file: Path, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "exporter", "--config.file", str(config_file), "--check-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_no_secret_in_check_config_output(tmp_path: Path) -> None:
    known = make_secrets(tmp_path, "http://127.0.0.1:1")
    good = _cli(known.config_file, known.environ)
    assert good.returncode == 0, good.stderr
    assert "rsa" in good.stdout
    assert "ed25519" in good.stdout
    (tmp_path / "rsa.pass").write_text("not-the-passphrase\n")
    (tmp_path / "hmac.secret").write_text("")
    bad = _cli(known.config_file, {**known.environ, "ED_PASS": "wrong"})
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    for name, text in (
        ("stdout", good.stdout + bad.stdout),
        ("stderr", good.stderr + bad.stderr),
    ):
        assert_no_secret(text, f"--check-config {name}", known.forms)
