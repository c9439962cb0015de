"""The configs a new user starts from: examples/minimal.yaml passes --check-config with
its two environment variables, and the key-pair commands in config.example.yaml's header
make keys the exporter loads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = ROOT / "examples" / "minimal.yaml"
EXAMPLE = ROOT / "config.example.yaml"
KEY = "minimal-api-key-s3cr3t"
SECRET = "minimal-api-secret-s3cr3t"


def check_config(path: Path, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BINANCE_")}
    return subprocess.run(
        [sys.executable, "-m", "exporter", "--config.file", str(path), "--check-config"],
        env={**clean, "PYTHONPATH": str(ROOT), **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_minimal_example_passes_with_its_two_variables() -> None:
    done = check_config(MINIMAL, {"BINANCE_API_KEY": KEY, "BINANCE_API_SECRET": SECRET})
    assert done.returncode == 0, done.stderr
    assert re.search(r"^  main\s+hmac\s+egress=default$", done.stdout, flags=re.MULTILINE)
    assert "https://papi.binance.com" in done.stdout  # Binance's own, unless told otherwise
    assert "s3cr3t" not in done.stdout + done.stderr


def test_the_minimal_example_names_the_variables_it_misses() -> None:
    done = check_config(MINIMAL, {})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{MINIMAL}: accounts[0].api_key: environment variable BINANCE_API_KEY is not set",
        f"{MINIMAL}: accounts[0].api_secret: environment variable BINANCE_API_SECRET is not set",
    ]


def header_commands() -> list[str]:
    """The shell commands in config.example.yaml's header, without their comments."""
    header = EXAMPLE.read_text().split("\n\n", 1)[0]
    commands = re.findall(r"^#\s{3,}((?:openssl|chmod) .*)$", header, flags=re.MULTILINE)
    return [command.split("  #", 1)[0].strip() for command in commands]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl on this machine")
@pytest.mark.parametrize("algorithm", ["ed25519", "RSA"])
def test_the_example_header_makes_key_pairs_the_exporter_loads(
    algorithm: str, tmp_path: Path
) -> None:
    commands = header_commands()
    generate = [c for c in commands if c.startswith(f"openssl genpkey -algorithm {algorithm} ")]
    assert len(generate) == 1, commands
    others = [c for c in commands if not c.startswith("openssl genpkey")]
    public = subprocess.run(
        " && ".join([*generate, *others]),
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    (pem,) = tmp_path.glob("*.pem")
    assert pem.stat().st_mode & 0o777 == 0o600
    private = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    registered = serialization.load_pem_public_key(public.encode())
    raw = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    assert registered.public_bytes(*raw) == private.public_key().public_bytes(*raw)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"accounts:\n  - name: desk-b\n    api_key: k\n    private_key_file: {pem.name}\n"
    )
    done = check_config(config, {})
    assert done.returncode == 0, done.stderr
    kind = "ed25519" if algorithm == "ed25519" else "rsa"
    assert re.search(rf"^  desk-b\s+{kind}\s", done.stdout, flags=re.MULTILINE)
