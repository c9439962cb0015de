"""Config: every failure mode gives one clean line naming the field; no secret leaks.

Key fixtures are generated at test time (no private key is committed): the
session fixture ``conf_dir`` writes keys/ and secrets/ next to copies of the
broken configs in tests/conffiles/, whose relative paths point there.
"""

from __future__ import annotations

import datetime
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from support.strategies import json_like

from exporter.budget import shard_limits
from exporter.cli import load_checked, main
from exporter.config import (
    AccountConfig,
    AssetFilter,
    Config,
    ConfigError,
    load_config,
    parse_config,
)
from exporter.summary import summarize

HERE = Path(__file__).parent
CONFFILES = sorted((HERE / "conffiles").glob("*.yaml"))
EXAMPLE = HERE.parent / "config.example.yaml"

PASSPHRASE = "test-passphrase-s3cr3t"
# Every fake secret in the fixtures contains this marker; no message may.
MARKER = "s3cr3t"
ENVIRON = {
    "TEST_API_KEY": "env-api-key-s3cr3t",
    "TEST_SECRET": "env-hmac-s3cr3t",
    "TEST_EMPTY": "",
}

_NO_ENCRYPTION = serialization.NoEncryption()
_PKCS8 = serialization.PrivateFormat.PKCS8
_PEM = serialization.Encoding.PEM


def _private_pem(key: Any, fmt: serialization.PrivateFormat = _PKCS8, password: str = "") -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else _NO_ENCRYPTION
    )
    pem: bytes = key.private_bytes(_PEM, fmt, encryption)
    return pem


def _public_pem(key: Any) -> bytes:
    pem: bytes = key.public_key().public_bytes(
        _PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def _certificate_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-only")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(_PEM)


@pytest.fixture(scope="session")
def conf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with test-only keys and secrets, and a copy of every conffile."""
    root = tmp_path_factory.mktemp("conf")
    keys, secrets = root / "keys", root / "secrets"
    keys.mkdir()
    secrets.mkdir()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ec_key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "keys/rsa.pem": _private_pem(rsa_key),
        "keys/rsa_traditional.pem": _private_pem(
            rsa_key, serialization.PrivateFormat.TraditionalOpenSSL
        ),
        "keys/rsa_encrypted.pem": _private_pem(rsa_key, password=PASSPHRASE),
        "keys/rsa_public.pem": _public_pem(rsa_key),
        "keys/ed25519.pem": _private_pem(ed_key),
        "keys/ed25519_encrypted.pem": _private_pem(ed_key, password=PASSPHRASE),
        "keys/ed25519_public.pem": _public_pem(ed_key),
        "keys/ec.pem": _private_pem(ec_key, serialization.PrivateFormat.TraditionalOpenSSL),
        "keys/ec_pkcs8.pem": _private_pem(ec_key),
        "keys/dsa.pem": _private_pem(dsa.generate_private_key(key_size=2048)),
        "keys/certificate.pem": _certificate_pem(ec_key),
        "keys/garbage.pem": (
            b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IHMzY3IzdA==\n-----END PRIVATE KEY-----\n"
        ),
        "secrets/api_key.txt": b"file-api-key-s3cr3t\n",
        "secrets/hmac.txt": b"file-hmac-s3cr3t\r\n",
        "secrets/passphrase.txt": PASSPHRASE.encode() + b"\n",
        "secrets/empty.txt": b"\n",
        "secrets/binary.bin": b"\xff\xfe\x00s3cr3t",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    for conffile in CONFFILES:
        shutil.copy(conffile, root / conffile.name)
    return root


@pytest.fixture(scope="session")
def environ(conf_dir: Path) -> dict[str, str]:
    return {**ENVIRON, "TEST_PEM": (conf_dir / "keys/ed25519.pem").read_text()}


def _expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    return first.removeprefix("# expect: ")


def _assert_clean(message: str, conf_dir: Path | None = None) -> None:
    assert "Traceback" not in message
    assert "input_value" not in message
    assert MARKER not in message
    assert "BEGIN" not in message or "'-----BEGIN ... PRIVATE KEY-----'" in message
    if conf_dir is not None:
        for pem in (conf_dir / "keys").glob("*.pem"):
            body = pem.read_text().splitlines()[1]
            assert body not in message


def _load_error(path: Path, environ: dict[str, str]) -> ConfigError:
    """The error the command line reports: loading, then the budget check of the wiring."""
    with pytest.raises(ConfigError) as info:
        load_checked(path, environ)
    return info.value


# ---- one broken config per file ---------------------------------------------


def test_there_are_enough_broken_configs() -> None:
    assert len(CONFFILES) >= 30


@pytest.mark.parametrize("conffile", CONFFILES, ids=[p.stem for p in CONFFILES])
def test_broken_config_gives_one_clean_line(
    conffile: Path, conf_dir: Path, environ: dict[str, str]
) -> None:
    expect = _expectation(conffile)
    error = _load_error(conf_dir / conffile.name, environ)
    assert len(error.problems) == 1, error.problems
    assert str(error) == error.problems[0]
    assert "\n" not in error.problems[0]
    assert expect in error.problems[0]
    # The file is named once, first (`y1.yaml: y1.yaml:21:2: ...` was twice).
    path = str(conf_dir / conffile.name)
    assert error.problems[0].startswith(path)
    assert error.problems[0].count(conffile.name) == 1
    _assert_clean(str(error), conf_dir)


def test_several_problems_give_one_line_each(conf_dir: Path) -> None:
    data = {
        "binance": {"recv_window_ms": 0, "nope": 1},
        "budget": {"share": 2},
        "accounts": [
            {"name": "a", "api_key": "k-s3cr3t"},
            {"name": "a", "api_key": "k-s3cr3t", "api_secret": "x-s3cr3t"},
            {"name": "b", "api_key": "${MISSING}", "api_secret_file": "missing.txt"},
        ],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={}, base_dir=conf_dir)
    problems = info.value.problems
    assert problems == [
        "accounts[2].api_key: environment variable MISSING is not set",
        "binance.recv_window_ms: must be >= 1 and <= 60000 (got 0)",
        "binance.nope: unknown key (allowed: base_url, stream_url, futures_base_url,"
        " recv_window_ms, timeout_seconds)",
        "budget.share: must be > 0 and <= 1 (got 2)",
        "accounts[1].name: duplicate account name 'a' (also accounts[0])",
        "accounts[0]: missing secret: give api_secret or api_secret_file (HMAC),"
        " or private_key or private_key_file (RSA or Ed25519)",
        f"accounts[2].api_secret_file: file not found: {conf_dir / 'missing.txt'}",
    ]
    _assert_clean(str(info.value))


# A Binance API key pasted where a key belongs: messages name it by its start only.
PASTED = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789s3cr3tIjKlMnOpQrStUvWx012345"
assert len(PASTED) == 64


def test_a_secret_pasted_as_a_key_is_named_not_quoted(tmp_path: Path) -> None:
    data = {**_minimal(**{PASTED: 1}), "binance": {PASTED: "${UNSET}"}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={}, base_dir=tmp_path)
    assert info.value.problems == [
        "binance.AbCd...(64 characters): environment variable UNSET is not set",
        "accounts[0].AbCd...(64 characters): unknown key (allowed: name, api_key, api_key_file,"
        " api_secret, api_secret_file, private_key, private_key_file, private_key_passphrase,"
        " private_key_passphrase_file, proxy, source_address, labels, thresholds)",
    ]
    path = tmp_path / "config.yaml"
    path.write_text(f"{PASTED}: 1\n{PASTED}: 2\n")
    error = _load_error(path, {})
    assert error.problems == [
        f"{path}:2:1: YAML syntax error: duplicate key 'AbCd...(64 characters)'"
    ]
    _assert_clean(str(error))


def test_keys_are_duplicates_by_value(tmp_path: Path) -> None:
    # `1` and `01` are the same integer key: the second would silently replace the first.
    path = tmp_path / "config.yaml"
    path.write_text("accounts: []\nbinance: {1: a, 01: b}\n")
    assert _load_error(path, {}).problems == [f"{path}:2:17: YAML syntax error: duplicate key '01'"]


def test_one_account_reports_each_problem_with_its_secrets(tmp_path: Path) -> None:
    data = _minimal(api_key_file="k.txt", private_key="pem", private_key_passphrase_file="p")
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={}, base_dir=tmp_path)
    assert info.value.problems == [
        "accounts[0]: both api_key and api_key_file given (give one)",
        "accounts[0]: both an HMAC secret (api_secret/api_secret_file) and a private key"
        " (private_key/private_key_file) given (give one)",
    ]


def test_numbers_from_variables_are_range_checked(tmp_path: Path) -> None:
    data = {**_minimal(), "budget": {"share": "${S}", "ip_weight_limit_per_minute": -(10**400)}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={"S": " 2 "}, base_dir=tmp_path)
    assert info.value.problems == [
        "budget.ip_weight_limit_per_minute: must be > 0 (got -1.00000e+400)",
        "budget.share: must be > 0 and <= 1 (got 2)",
    ]


def test_the_command_line_refuses_a_budget_below_one_refresh(
    conf_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = conf_dir / "budget_below_one_refresh.yaml"
    assert main(["--config.file", str(path), "--check-config"], environ={}) == 2
    assert capsys.readouterr().err == (
        f"{path}: budget.share: the budget ip_weight_limit_per_minute x share = 30 weight/min"
        " cannot pay for one account refresh (40 weight)\n"
    )


def test_missing_config_file(tmp_path: Path) -> None:
    error = _load_error(tmp_path / "config.yaml", {})
    assert error.problems == [
        f"{tmp_path / 'config.yaml'}: cannot read config file: file not found"
    ]
    error = _load_error(tmp_path, {})
    assert error.problems == [f"{tmp_path}: cannot read config file: is a directory, not a file"]


def test_yaml_error_does_not_quote_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("accounts:\n  - name: a\n    api_secret: 'abc-s3cr3t\n    x: [\n")
    error = _load_error(path, {})
    assert error.problems[0].startswith(f"{path}:")
    assert ": YAML syntax error: " in error.problems[0]
    _assert_clean(str(error))


def test_self_referencing_alias_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("accounts: &loop [*loop]\n")
    error = _load_error(path, {})
    assert error.problems == [f"{path}: accounts[0]: a YAML alias refers to itself"]


def test_alias_bomb_is_cheap(tmp_path: Path) -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "config.yaml"
    path.write_text("extra:\n" + "\n".join("  " + line for line in levels) + "\n")
    error = _load_error(path, {})
    assert error.problems[0].startswith(f"{path}: extra: unknown key (allowed: binance, budget")


# ---- a valid config -----------------------------------------------------------


def _minimal(**account: Any) -> dict[str, Any]:
    return {"accounts": [{"name": "desk-a", "api_key": "key-1", "api_secret": "s-1", **account}]}


def test_the_time_host_follows_the_pm_host_unless_given(tmp_path: Path) -> None:
    """Binance's futures host beside Binance's PM host; a simulator or gateway standing in
    for the PM host serves the time too; an explicit futures_base_url wins."""
    binance = parse_config(_minimal(), environ={}, base_dir=tmp_path).binance
    assert binance.futures_url == "https://fapi.binance.com"
    local = {**_minimal(), "binance": {"base_url": "http://127.0.0.1:9"}}
    assert parse_config(local, environ={}, base_dir=tmp_path).binance.futures_url == (
        "http://127.0.0.1:9"
    )
    given = {**_minimal(), "binance": {"futures_base_url": "https://fapi.example/"}}
    assert parse_config(given, environ={}, base_dir=tmp_path).binance.futures_url == (
        "https://fapi.example"
    )


def test_defaults(tmp_path: Path) -> None:
    config = parse_config(_minimal(), environ={}, base_dir=tmp_path)
    assert config.binance.base_url == "https://papi.binance.com"
    assert config.binance.recv_window_ms == 5000
    assert config.binance.timeout_seconds == 10
    assert config.budget.ip_weight_limit_per_minute == 6000
    assert config.budget.share == 0.25
    assert shard_limits(config.budget).per_minute == 1500
    assert config.budget.ip_high_water == 0.8
    assert config.budget.min_interval_seconds == 10
    assert config.collect.account_info is True
    assert config.collect.assets.include == []
    assert config.collect.assets.exclude == []
    assert config.binance.stream_url == "wss://fstream.binance.com/pm/ws"
    assert config.stream.enabled is True
    assert config.stream.min_refresh_interval_seconds == 2
    (account,) = config.accounts
    assert account.name == "desk-a"
    assert account.api_key.get_secret_value() == "key-1"
    assert account.api_secret is not None
    assert account.api_secret.get_secret_value() == "s-1"
    assert account.private_key is None
    assert account.key_type == "hmac"
    assert account.route.label == "default"


def test_null_sections_mean_defaults(tmp_path: Path) -> None:
    data = {
        **_minimal(),
        "binance": None,
        "budget": None,
        "collect": {"assets": None},
        "stream": None,
    }
    config = parse_config(data, environ={}, base_dir=tmp_path)
    assert config.binance.recv_window_ms == 5000
    assert config.stream.enabled is True
    assert config.collect.assets.include == []


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("wss://fstream.binance.com/pm/ws", "wss://fstream.binance.com/pm/ws"),
        # the official SDKs' constant (the docs' "Base Url"): read as the documented form
        ("wss://fstream.binance.com/pm", "wss://fstream.binance.com/pm/ws"),
        ("wss://fstream.binance.com/pm/", "wss://fstream.binance.com/pm/ws"),
        ("ws://127.0.0.1:8080/pm", "ws://127.0.0.1:8080/pm/ws"),
        ("wss://relay.example:9443/binance/pm/ws/", "wss://relay.example:9443/binance/pm/ws"),
    ],
)
def test_the_stream_url_is_the_documented_root(tmp_path: Path, given: str, used: str) -> None:
    data = {**_minimal(), "binance": {"stream_url": given}}
    config = parse_config(data, environ={}, base_dir=tmp_path)
    assert config.binance.stream_url == used


def test_values_are_normalised(tmp_path: Path) -> None:
    data = {
        **_minimal(source_address="2001:DB8:0:0::7"),
        "binance": {
            "base_url": "http://127.0.0.1:8080/",
            "timeout_seconds": "2.5",
            "stream_url": " ws://127.0.0.1:8080/pm/ws/ ",
        },
        "stream": {"enabled": False, "min_refresh_interval_seconds": "0.5"},
        "collect": {"assets": {"include": ["btc", "USDT"], "exclude": None}},
    }
    config = parse_config(data, environ={}, base_dir=tmp_path)
    assert config.binance.base_url == "http://127.0.0.1:8080"
    assert config.binance.timeout_seconds == 2.5
    assert config.binance.stream_url == "ws://127.0.0.1:8080/pm/ws"
    assert config.stream.enabled is False
    assert config.stream.min_refresh_interval_seconds == 0.5
    assert config.collect.assets.include == ["BTC", "USDT"]
    assert config.accounts[0].source_address == "2001:db8::7"
    assert config.accounts[0].route.label == "source:2001:db8::7"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = parse_config(_minimal(), environ={}, base_dir=tmp_path)
    with pytest.raises(ValidationError):
        config.budget.share = 1.0
    with pytest.raises(ValidationError):
        config.accounts[0].name = "other"


def test_asset_filter_allows() -> None:
    everything = AssetFilter()
    assert everything.allows("BTC")
    only = AssetFilter(include=["BTC", "usdt"], exclude=[])
    assert only.allows("BTC")
    assert only.allows("usdt")
    assert not only.allows("ETH")
    without = AssetFilter(include=[], exclude=["BNB"])
    assert without.allows("BTC")
    assert not without.allows("BNB")


def test_example_config_documents_every_key_and_loads(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    documented = {
        "binance", "budget", "collect", "accounts", "base_url", "recv_window_ms",
        "timeout_seconds", "ip_weight_limit_per_minute", "share", "ip_high_water",
        "min_interval_seconds", "account_info", "assets", "include", "exclude", "name",
        "api_key", "api_key_file", "api_secret", "api_secret_file", "private_key",
        "private_key_file", "private_key_passphrase", "private_key_passphrase_file",
        "proxy", "source_address", "labels", "thresholds", "uni_mmr_warning",
        "uni_mmr_critical", "accounts_dir",
    }  # fmt: skip
    for key in documented:
        assert f"{key}:" in text, key
    ed_pem = _private_pem(ed25519.Ed25519PrivateKey.generate()).decode()
    (tmp_path / "desk_a_secret").write_text("secret-a\n")
    (tmp_path / "desk_b_key").write_text("key-b\n")
    (tmp_path / "desk_b.pem").write_text(ed_pem)
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("/run/secrets/", f"{tmp_path}/"))
    environ = {
        "DESK_A_API_KEY": "key-a",
        "DESK_C_API_KEY": "key-c",
        "DESK_C_PRIVATE_KEY_PEM": ed_pem,
        "PROXY_USER": "user",
        "PROXY_PASSWORD": "pw-s3cr3t",
    }
    config = load_config(path, environ)
    assert config.binance == type(config.binance)()
    assert config.budget == type(config.budget)()
    assert [a.name for a in config.accounts] == ["desk-a", "desk-b", "desk-c"]
    assert [a.key_type for a in config.accounts] == ["hmac", "ed25519", "ed25519"]
    assert config.accounts[2].route.label.startswith("proxy:http://proxy.internal:3128#")
    _assert_clean(summarize(config))


# ---- ${VAR} interpolation -----------------------------------------------------


def test_interpolation_forms(tmp_path: Path) -> None:
    environ = {"KEY": "k-1", "SECRET": "s-1", "PORT": "8080", "RW": "6000", "EMPTY": ""}
    data = {
        "binance": {
            "base_url": "http://127.0.0.1:${PORT}",
            "recv_window_ms": "${RW}",
            "timeout_seconds": "${UNSET:-3}",
        },
        "budget": {"share": "${EMPTY:-0.5}"},
        "accounts": [
            {"name": "a-${PORT}", "api_key": "${KEY}", "api_secret": "$${KEY}${SECRET}"},
        ],
    }
    config = parse_config(data, environ=environ, base_dir=tmp_path)
    assert config.binance.base_url == "http://127.0.0.1:8080"
    assert config.binance.recv_window_ms == 6000
    assert config.binance.timeout_seconds == 3
    assert config.budget.share == 0.5
    account = config.accounts[0]
    assert account.name == "a-8080"
    assert account.api_key.get_secret_value() == "k-1"
    assert account.api_secret is not None
    assert account.api_secret.get_secret_value() == "${KEY}s-1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${UNSET:-${KEY}}", "k-1"),
        ("${KEY:-${UNSET}}", "k-1"),  # a default not used needs no variable
        ("${EMPTY:-${UNSET:-x}}-y", "x-y"),
        ("a${UNSET:-b${UNSET:-c}d}e", "abcde"),
    ],
)
def test_nested_defaults(tmp_path: Path, text: str, expected: str) -> None:
    environ = {"KEY": "k-1", "EMPTY": ""}
    config = parse_config(_minimal(api_secret=text), environ=environ, base_dir=tmp_path)
    secret = config.accounts[0].api_secret
    assert secret is not None
    assert secret.get_secret_value() == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("${UNSET:-${ALSO_UNSET}}", "environment variable ALSO_UNSET is not set"),
        ("${UNSET:-${KEY}", "malformed ${...} reference"),
        ("${A:-" * 9 + "x" + "}" * 9, "${...} defaults nested more than 8 deep"),
    ],
)
def test_nested_defaults_that_fail(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_minimal(api_secret=text), environ={"KEY": "k"}, base_dir=tmp_path)
    (line,) = info.value.problems
    assert line.startswith(f"accounts[0].api_secret: {problem}")


def test_keys_are_not_interpolated(tmp_path: Path) -> None:
    data = {**_minimal(), "${X}": 1}
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={"X": "budget"}, base_dir=tmp_path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("${X}: unknown key")


def test_undefined_variable_names_variable_not_value(tmp_path: Path) -> None:
    data = _minimal(api_secret="prefix-s3cr3t-${NOT_SET}", proxy="http://u:${PW}@h:1")
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={}, base_dir=tmp_path)
    assert info.value.problems == [
        "accounts[0].api_secret: environment variable NOT_SET is not set",
        "accounts[0].proxy: environment variable PW is not set",
    ]


# ---- files and keys -------------------------------------------------------------


def _account(config: Config) -> AccountConfig:
    (account,) = config.accounts
    return account


def test_secret_files_are_relative_to_the_config_and_stripped(
    conf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not the config's directory
    path = conf_dir / "files_ok.yaml"
    path.write_text(
        "accounts:\n  - name: a\n    api_key_file: secrets/api_key.txt\n"
        "    api_secret_file: secrets/hmac.txt\n"
    )
    account = _account(load_config(path, {}))
    assert account.api_key.get_secret_value() == "file-api-key-s3cr3t"
    assert account.api_secret is not None
    assert account.api_secret.get_secret_value() == "file-hmac-s3cr3t"


@pytest.mark.parametrize(
    ("key_lines", "expected_type"),
    [
        ("private_key_file: keys/rsa.pem", RSAPrivateKey),
        ("private_key_file: keys/rsa_traditional.pem", RSAPrivateKey),
        ("private_key_file: keys/ed25519.pem", Ed25519PrivateKey),
        ("private_key: ${TEST_PEM}", Ed25519PrivateKey),
        (
            f"private_key_file: keys/rsa_encrypted.pem\n    private_key_passphrase: {PASSPHRASE}",
            RSAPrivateKey,
        ),
        (
            "private_key_file: keys/ed25519_encrypted.pem\n"
            "    private_key_passphrase_file: secrets/passphrase.txt",
            Ed25519PrivateKey,
        ),
    ],
    ids=["rsa", "rsa-traditional", "ed25519", "ed25519-inline", "rsa-encrypted", "ed-encrypted"],
)
def test_each_key_type_loads(
    conf_dir: Path, environ: dict[str, str], key_lines: str, expected_type: type
) -> None:
    path = conf_dir / "key_ok.yaml"
    path.write_text(f"accounts:\n  - name: a\n    api_key: k\n    {key_lines}\n")
    account = _account(load_config(path, environ))
    assert isinstance(account.private_key, expected_type)
    assert account.api_secret is None
    assert account.key_type == ("rsa" if expected_type is RSAPrivateKey else "ed25519")


def test_inline_pem_block_scalar(conf_dir: Path) -> None:
    pem = (conf_dir / "keys/rsa.pem").read_text()
    block = "".join(f"      {line}\n" for line in pem.splitlines())
    path = conf_dir / "inline_ok.yaml"
    path.write_text(f"accounts:\n  - name: a\n    api_key: k\n    private_key: |\n{block}")
    assert _account(load_config(path, {})).key_type == "rsa"


# ---- secrets never print --------------------------------------------------------


def test_secrets_do_not_leak_from_the_config_objects(
    conf_dir: Path, environ: dict[str, str]
) -> None:
    path = conf_dir / "leak.yaml"
    path.write_text(
        "accounts:\n"
        "  - name: hmac-acc\n    api_key: ${TEST_API_KEY}\n    api_secret: ${TEST_SECRET}\n"
        "  - name: rsa-acc\n    api_key_file: secrets/api_key.txt\n"
        "    private_key_file: keys/rsa_encrypted.pem\n"
        "    private_key_passphrase_file: secrets/passphrase.txt\n"
        "    proxy: http://user:proxy-s3cr3t@proxy.internal:3128\n"
    )
    config = load_config(path, environ)
    texts = [
        repr(config),
        str(config),
        config.model_dump_json(),
        json.dumps(config.model_dump(mode="json")),
        *(repr(a) for a in config.accounts),
        *(str(a) for a in config.accounts),
        *(a.route.label for a in config.accounts),
        *(repr(a.route) for a in config.accounts),
        summarize(config),
    ]
    for text in texts:
        _assert_clean(text, conf_dir)
        assert PASSPHRASE not in text
    dumped = config.model_dump(mode="json")
    assert dumped["accounts"][1]["private_key"] == "<rsa private key>"
    assert dumped["accounts"][1]["proxy"] == "http://proxy.internal:3128"
    # The client still gets the real values.
    rsa_account = config.accounts[1]
    assert rsa_account.proxy == "http://user:proxy-s3cr3t@proxy.internal:3128"
    assert config.accounts[0].api_key.get_secret_value() == "env-api-key-s3cr3t"


@pytest.mark.parametrize(
    ("proxy", "source", "egress"),
    [
        (None, None, "default"),
        # credentials: a fingerprint of them, stable across restarts; never the credentials
        ("http://u:p@proxy.internal:3128", None, "proxy:http://proxy.internal:3128#617a0cd0"),
        ("HTTP://u:p@Proxy.Internal:3128/", None, "proxy:http://proxy.internal:3128#617a0cd0"),
        ("socks5h://u@[2001:db8::1]:1080/", None, "proxy:socks5h://[2001:db8::1]:1080#4634929f"),
        # proxy and source address: the proxy is reached from the source address
        ("https://proxy.internal", "10.0.0.2", "source:10.0.0.2,proxy:https://proxy.internal"),
        (None, "10.0.0.2", "source:10.0.0.2"),
    ],
)
def test_route(tmp_path: Path, proxy: str | None, source: str | None, egress: str) -> None:
    extra = {k: v for k, v in (("proxy", proxy), ("source_address", source)) if v}
    config = parse_config(_minimal(**extra), environ={}, base_dir=tmp_path)
    route = config.accounts[0].route
    assert route.label == egress
    assert repr(route) == f"Route({egress})"
    assert route.source_address == source


# ---- summarize ----------------------------------------------------------------


def test_summarize(conf_dir: Path) -> None:
    accounts = [{"name": f"h{i:02}", "api_key": "k", "api_secret": "hmac-s3cr3t"} for i in range(9)]
    accounts.append(
        {
            "name": "ed",
            "api_key": "k",
            "private_key_file": "keys/ed25519.pem",
            "source_address": "10.1.2.3",
        }
    )
    data = {"binance": {"base_url": "http://127.0.0.1:1234"}, "accounts": accounts}
    text = summarize(parse_config(data, environ={}, base_dir=conf_dir))
    assert "http://127.0.0.1:1234" in text
    assert "40 weight per account refresh" in text
    assert "B = 6000 x 0.25 = 1500 weight/min" in text
    assert ">= 4800" in text
    # 9 accounts x 40 / 1500 per minute = 14.4 s > 10 s: the budget binds. The budget's
    # minute is its 60.5 s guard window, so 14.52 s, and the line says so: it adds up.
    assert "refresh (default): 9 account(s) x 40 / 1500 x 60.5 s = 14.52 s by budget" in text
    assert pytest.approx(14.52) == 9 * 40 / 1500 * 60.5
    assert (
        "budget minute: 60.5 s, Binance's 60 s plus 0.5 s for the network's jitter between"
        " our clock and Binance's: B is spent over it, so that no minute Binance counts holds"
        " more than B\n" in text
    )
    assert "each account every 14.52 s (budget)" in text
    assert "refresh (source:10.1.2.3): 1 account(s)" in text
    assert "each account every 10 s (min_interval)" in text
    assert (
        "stream: wss://fstream.binance.com/pm/ws/<listenKey>, one per account; an event"
        " refreshes its account at most every 2 s, within B/2 = 750 weight/min" in text
    )
    assert "accounts (10):" in text
    assert "h00  hmac     egress=default" in text
    assert "ed   ed25519  egress=source:10.1.2.3" in text
    _assert_clean(text, conf_dir)


def test_summarize_without_account_info(tmp_path: Path) -> None:
    data = {**_minimal(), "collect": {"account_info": False, "assets": {"exclude": ["BNB"]}}}
    text = summarize(parse_config(data, environ={}, base_dir=tmp_path))
    expected = "GET /papi/v1/balance (20) = 20 weight per account refresh; assets all except BNB"
    assert expected in text
    data = {**_minimal(), "stream": {"enabled": False}}
    text = summarize(parse_config(data, environ={}, base_dir=tmp_path))
    assert "stream: disabled (polling only)" in text


# ---- nothing but ConfigError, whatever the input -----------------------------


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["${X}", "${", "$${X}", "0", "-1", "1e400", "NaN", "desk-a", "a b", ""])
)
_values = json_like(_scalars)
_keys = st.sampled_from(
    ["binance", "budget", "collect", "accounts", "name", "api_key", "api_key_file",
     "api_secret", "api_secret_file", "private_key", "private_key_file",
     "private_key_passphrase", "private_key_passphrase_file", "proxy", "source_address",
     "share", "assets", "include", "exclude", "base_url", "recv_window_ms"]
) | st.text(max_size=8)  # fmt: skip


def _fuzz_error_is_clean(error: ConfigError, secrets: tuple[str, ...] = ()) -> None:
    assert error.problems
    for line in error.problems:
        assert line
        assert "\n" not in line
        for secret in secrets:
            assert secret not in line
    assert "Traceback" not in str(error)
    assert "input_value" not in str(error)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_random_text_gives_config_error_only(
    text: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-text.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    try:
        load_config(path, {})
    except ConfigError as error:
        _fuzz_error_is_clean(error)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(document=st.dictionaries(_keys, _values, max_size=5) | _values)
def test_random_documents_give_config_error_only(
    document: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-doc.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(path, {})
    except ConfigError as error:
        _fuzz_error_is_clean(error)


_FUZZ_SECRETS = ("fuzz-key-s3cr3t", "fuzz-hmac-s3cr3t", "fuzz-proxy-s3cr3t")


def _valid_document() -> dict[str, Any]:
    return {
        "binance": {"base_url": "http://127.0.0.1:9", "recv_window_ms": 5000, "timeout_seconds": 5},
        "budget": {"ip_weight_limit_per_minute": 6000, "share": 0.5, "ip_high_water": 0.8,
                   "min_interval_seconds": 10},
        "collect": {"account_info": True, "assets": {"include": ["BTC"], "exclude": ["ETH"]}},
        "accounts": [
            {"name": "a", "api_key": "fuzz-key-s3cr3t", "api_secret": "fuzz-hmac-s3cr3t"},
            {"name": "b", "api_key": "fuzz-key-s3cr3t", "api_secret": "fuzz-hmac-s3cr3t",
             "proxy": "http://u:fuzz-proxy-s3cr3t@proxy:3128", "source_address": "127.0.0.1"},
        ],
    }  # fmt: skip


def _containers(node: object) -> Iterator[dict[str, Any] | list[Any]]:
    if isinstance(node, dict | list):
        yield node
        for child in node.values() if isinstance(node, dict) else node:
            yield from _containers(child)


@st.composite
def _mutated(draw: st.DrawFn) -> dict[str, Any]:
    document = _valid_document()
    for _ in range(draw(st.integers(1, 3))):
        container = draw(st.sampled_from(list(_containers(document))))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if isinstance(container, dict):
            if action == "add" or not container:
                container[draw(_keys)] = draw(_values)
                continue
            key = draw(st.sampled_from(sorted(container)))
            if action == "delete":
                del container[key]
            else:
                container[key] = draw(_values)
        else:
            if action == "add" or not container:
                container.append(draw(_values))
                continue
            index = draw(st.integers(0, len(container) - 1))
            if action == "delete":
                del container[index]
            else:
                container[index] = draw(_values)
    return document


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(document=_mutated())
def test_mutated_configs_give_config_error_only(document: dict[str, Any]) -> None:
    try:
        config = parse_config(document, environ={"X": "1"}, base_dir=Path("/nonexistent-bpe"))
    except ConfigError as error:
        _fuzz_error_is_clean(error, _FUZZ_SECRETS)
    else:
        for secret in _FUZZ_SECRETS:
            assert secret not in summarize(config)
            assert secret not in repr(config)
            assert secret not in config.model_dump_json()


# ---- issue 22's config fixes: each with its exact message -------------------------


@pytest.mark.parametrize("value", ["$DESK_A_API_KEY", " $DESK_A_API_KEY "])
def test_a_variable_without_braces_is_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"accounts:\n  - name: a\n    api_key: '{value}'\n    api_secret: x\n")
    error = _load_error(path, {"DESK_A_API_KEY": "k-s3cr3t"})
    assert error.problems == [
        f"{path}: accounts[0].api_key: $DESK_A_API_KEY is not substituted:"
        " did you mean ${DESK_A_API_KEY}?"
    ]
    # Only a whole value of that form: a $ inside a value (a password) is left alone.
    data = _minimal(api_secret="pa$word", proxy="http://u:pa$$w@proxy:3128")
    account = _account(parse_config(data, environ={}, base_dir=tmp_path))
    assert account.api_secret is not None
    assert account.api_secret.get_secret_value() == "pa$word"


PERCENT_ENCODE = "percent-encode it (e.g. @ as %40, / as %2F, # as %23, : as %3A)"


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        (
            "http://user:pa/ss-s3cr3t@proxy.internal:3128",
            f"not a valid URL: the password has a reserved character: {PERCENT_ENCODE}",
        ),
        (
            "http://user:p@ss-s3cr3t@proxy.internal:3128",
            f"not a valid URL: the password has a reserved character: {PERCENT_ENCODE}",
        ),
        (
            "http://user:pa#ss-s3cr3t@proxy.internal:3128",
            f"not a valid URL: the password has a reserved character: {PERCENT_ENCODE}",
        ),
        (
            "http://us er:s3cr3t@proxy.internal:3128",
            f"not a valid URL: the user name has a reserved character: {PERCENT_ENCODE}",
        ),
        (
            "http://user:s3cr3t@proxy.internal:99999",
            "not a valid URL: the port is not a number from 1 to 65535",
        ),
        (
            "http://user:s3cr3t@proxy.internal:31x8",
            "not a valid URL: the port is not a number from 1 to 65535",
        ),
        ("http://user:s3cr3t@:3128", "not a valid URL: no host"),
        ("proxy.internal:3128", "not a valid URL: no scheme (write http://host:port)"),
    ],
)
def test_a_proxy_url_names_the_part_that_is_wrong(tmp_path: Path, proxy: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_minimal(proxy=proxy), environ={}, base_dir=tmp_path)
    assert info.value.problems == [f"accounts[0].proxy: {message}"]
    _assert_clean(str(info.value))
    assert "pa/ss" not in str(info.value)


def test_a_percent_encoded_proxy_password_is_accepted(tmp_path: Path) -> None:
    proxy = "http://user:p%40ss%2Fw%23rd-s3cr3t@proxy.internal:3128"
    account = _account(parse_config(_minimal(proxy=proxy), environ={}, base_dir=tmp_path))
    assert account.proxy == proxy
    assert account.route.label.startswith("proxy:http://proxy.internal:3128#")


def test_the_command_line_names_the_file_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "y1.yaml"
    path.write_text("accounts:\n  - name: a\n   api_key: x\n")
    assert main(["--config.file", str(path), "--check-config"], environ={}) == 2
    assert capsys.readouterr().err == (
        f"{path}:3:4: YAML syntax error: while parsing a block collection (at 2:3);"
        " expected <block end>, but found '<block mapping start>'\n"
    )
    nope = tmp_path / "nope.yaml"
    assert main(["--config.file", str(nope), "--check-config"], environ={}) == 2
    assert capsys.readouterr().err == f"{nope}: cannot read config file: file not found\n"
    path.write_text("accounts:\n  - name: a\n    api_key: x\n")
    assert main(["--config.file", str(path), "--check-config"], environ={}) == 2
    assert capsys.readouterr().err == (
        f"{path}: accounts[0]: missing secret: give api_secret or api_secret_file (HMAC),"
        " or private_key or private_key_file (RSA or Ed25519)\n"
    )


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"], environ={})
    text = " ".join(capsys.readouterr().out.split())
    for default in (
        "(default: config.yaml; env BINANCE_PM_EXPORTER_CONFIG_FILE)",
        "(default: :9745, every address; with --demo, 127.0.0.1:9745; env"
        " BINANCE_PM_EXPORTER_WEB_LISTEN_ADDRESS)",
        "(default: none, plain HTTP without auth; env BINANCE_PM_EXPORTER_WEB_CONFIG_FILE)",
        "(default: 1000; env BINANCE_PM_EXPORTER_WEB_MAX_CONNECTIONS)",
        "(default: 40; env BINANCE_PM_EXPORTER_WEB_MAX_REQUESTS)",
        "(default: 10; env BINANCE_PM_EXPORTER_WEB_READ_HEADER_TIMEOUT)",
        "(default: 65536; env BINANCE_PM_EXPORTER_WEB_MAX_HEADER_BYTES)",
        "(default: info; env BINANCE_PM_EXPORTER_LOG_LEVEL)",
        "(default: json, or console when stderr is a terminal; env BINANCE_PM_EXPORTER_LOG_FORMAT)",
        "(default: 0/1; env BINANCE_PM_EXPORTER_SHARD)",
        "(default: none, off; env BINANCE_PM_EXPORTER_STORAGE_PATH)",
        "(default: off; env BINANCE_PM_EXPORTER_CHECK_CONFIG=true)",
        "(default: off; env BINANCE_PM_EXPORTER_WEB_ENABLE_LIFECYCLE=true)",
        "(default: off; env BINANCE_PM_EXPORTER_DEMO=true)",
    ):
        assert default in text
    # every option but --help and --version says its default
    flags = [w for w in text.split() if w.startswith("--") and w not in ("--help", "--version")]
    options = {f.strip("[],") for f in flags}
    assert text.count("(default: ") == len(options), sorted(options)


# ---- account labels and thresholds --------------------------------------------------


def test_account_labels_and_thresholds(tmp_path: Path) -> None:
    data = _minimal(
        labels={"desk": "mm", "team": "${TEAM}"},
        thresholds={"uni_mmr_warning": 1.3, "uni_mmr_critical": "1.1"},
    )
    account = _account(parse_config(data, environ={"TEAM": "alpha"}, base_dir=tmp_path))
    assert account.labels == {"desk": "mm", "team": "alpha"}
    assert account.thresholds.given() == {"uni_mmr_warning": 1.3, "uni_mmr_critical": 1.1}
    plain = _account(parse_config(_minimal(labels=None), environ={}, base_dir=tmp_path))
    assert plain.labels == {}
    assert plain.thresholds.given() == {}


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (
            {"labels": {"1desk": "a"}},
            "accounts[0].labels: label name '1desk' is not a Prometheus label name"
            " (letters, digits and _, not starting with a digit)",
        ),
        (
            {"labels": {"desk-name": "a"}},
            "accounts[0].labels: label name 'desk-name' is not a Prometheus label name"
            " (letters, digits and _, not starting with a digit)",
        ),
        (
            {"labels": {"__desk": "a"}},
            "accounts[0].labels: label name '__desk' is reserved (names starting with __ are)",
        ),
        (
            {"labels": {"account": "a"}},
            "accounts[0].labels: label name 'account' is reserved"
            " (the exporter, Prometheus or the alerts use it)",
        ),
        (
            {"labels": {"asset": "a"}},
            "accounts[0].labels: label name 'asset' is reserved"
            " (the exporter, Prometheus or the alerts use it)",
        ),
        (
            {"labels": {f"l{i}": "v" for i in range(9)}},
            "accounts[0].labels: at most 8 labels (got 9)",
        ),
        ({"labels": {"desk": " "}}, "accounts[0].labels: label 'desk' must not be empty"),
        (
            {"labels": {"desk": "x" * 129}},
            "accounts[0].labels: label 'desk': at most 128 printable characters",
        ),
        ({"labels": {"desk": 3}}, "accounts[0].labels.desk: must be a string (got 3)"),
        ({"labels": ["desk"]}, "accounts[0].labels: must be a mapping (got a list)"),
        (
            {"thresholds": {"uni_mmr_warning": 1.2, "uni_mmr_critical": 1.3}},
            "accounts[0].thresholds: uni_mmr_critical must be below uni_mmr_warning"
            " (an account is critical below the lower one)",
        ),
        (
            {"thresholds": {"uni_mmr_critical": 0.9}},
            "accounts[0].thresholds.uni_mmr_critical: must be > 1 and <= 1000 (got 0.9)",
        ),
        (
            {"thresholds": {"uni_mmr_warnin": 2}},
            "accounts[0].thresholds.uni_mmr_warnin: unknown key (did you mean uni_mmr_warning?)",
        ),
    ],
)
def test_account_labels_and_thresholds_are_checked(
    tmp_path: Path, extra: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_minimal(**extra), environ={}, base_dir=tmp_path)
    assert info.value.problems == [problem]
