"""accounts_dir: accounts from one YAML file each (or several per file), as Kubernetes
mounts one Secret per account; read at start and at every reload."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.exporterproc import running
from support.faultkit import hmac_accounts
from support.waits import wait_until

from exporter.cli import load_checked, main
from exporter.config import ConfigError, load_config
from exporter.simulator import Simulator


def _write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _account(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "api_key": f"key-{name}", "api_secret": f"s3cr3t-{name}", **extra}


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """config.yaml with one inline account and accounts_dir: accounts.d (relative)."""
    return _write(
        tmp_path / "config.yaml",
        {"accounts_dir": "accounts.d", "accounts": [_account("inline")]},
    )


def _error(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_checked(path, environ or {})
    assert "s3cr3t" not in str(info.value)
    return info.value.problems


def test_accounts_come_from_every_yaml_file_in_the_directory(conf: Path) -> None:
    accounts = conf.parent / "accounts.d"
    _write(accounts / "b.yaml", _account("desk-b", labels={"desk": "b"}))
    _write(accounts / "a.yaml", [_account("desk-a1"), _account("desk-a2")])
    (accounts / "secrets").mkdir()
    (accounts / "secrets" / "c.secret").write_text("s3cr3t-from-file\n")
    _write(
        accounts / "c.yaml",
        {"name": "desk-c", "api_key": "${C_KEY}", "api_secret_file": "secrets/c.secret"},
    )
    (accounts / "notes.txt").write_text("not an account")
    (accounts / "d.yml").write_text("not read: only *.yaml")
    config = load_config(conf, {"C_KEY": "key-c"})
    names = [a.name for a in config.accounts]
    # the config's own first, then the files by name, each file's accounts in order
    assert names == ["inline", "desk-a1", "desk-a2", "desk-b", "desk-c"]
    by_name = {a.name: a for a in config.accounts}
    assert by_name["desk-b"].labels == {"desk": "b"}
    # a relative path in an account file is relative to that file
    secret = by_name["desk-c"].api_secret
    assert secret is not None
    assert secret.get_secret_value() == "s3cr3t-from-file"
    assert config.accounts_dir == str(accounts)


def test_a_kubernetes_secret_volume_is_read_once(tmp_path: Path) -> None:
    """A Secret or projected volume: each file a link into ..data, itself a link to a
    timestamped directory; only the links at the top are accounts."""
    accounts = tmp_path / "accounts.d"
    payload = accounts / "..2026_12_03_07_00_00.000000001"
    _write(payload / "desk-a.yaml", _account("desk-a"))
    _write(payload / "desk-b.yaml", _account("desk-b"))
    (accounts / "..data").symlink_to(payload.name)
    for name in ("desk-a.yaml", "desk-b.yaml"):
        (accounts / name).symlink_to(f"..data/{name}")
    conf = _write(tmp_path / "config.yaml", {"accounts_dir": str(accounts)})
    assert [a.name for a in load_config(conf, {}).accounts] == ["desk-a", "desk-b"]


def test_a_name_in_two_files_names_both(conf: Path) -> None:
    accounts = conf.parent / "accounts.d"
    _write(accounts / "a.yaml", _account("desk-x"))
    _write(accounts / "b.yaml", [_account("desk-y"), _account("desk-x")])
    _write(accounts / "c.yaml", _account("inline"))
    assert _error(conf) == [
        f"{accounts / 'b.yaml'}: duplicate account name 'desk-x' (also in {accounts / 'a.yaml'})",
        f"{accounts / 'c.yaml'}: duplicate account name 'inline'"
        " (also in the config's accounts[0])",
    ]


def test_a_name_twice_in_one_file(conf: Path) -> None:
    accounts = conf.parent / "accounts.d"
    _write(accounts / "a.yaml", [_account("desk-x"), _account("desk-x")])
    assert _error(conf) == [
        f"{accounts / 'a.yaml'}: [1].name: duplicate account name 'desk-x' (also [0])"
    ]


def test_a_broken_account_file_is_named_once(conf: Path) -> None:
    accounts = conf.parent / "accounts.d"
    _write(accounts / "ok.yaml", _account("desk-ok"))
    _write(accounts / "a.yaml", {"name": "desk-a", "api_key": "$A_KEY", "api_secret": "x"})
    (accounts / "b.yaml").write_text("name: desk-b\n api_key: x\n")
    _write(accounts / "c.yaml", [_account("desk-c1"), {"name": "desk-c2", "api_key": "k"}])
    _write(accounts / "d.yaml", "just a string")
    (accounts / "e.yaml").write_text("")
    assert _error(conf) == [
        f"{accounts / 'a.yaml'}: api_key: $A_KEY is not substituted: did you mean ${{A_KEY}}?",
        f"{accounts / 'b.yaml'}:2:9: YAML syntax error:"
        " mapping values are not allowed in this context",
        f"{accounts / 'c.yaml'}: [1]: missing secret: give api_secret or api_secret_file"
        " (HMAC), or private_key or private_key_file (RSA or Ed25519)",
        f"{accounts / 'd.yaml'}: (top level): must be an account or a list of accounts"
        " (got a string)",
        f"{accounts / 'e.yaml'}: (top level): must be an account or a list of accounts"
        " (got an empty document)",
    ]


def test_the_directory_must_exist_and_hold_an_account(tmp_path: Path) -> None:
    conf = _write(tmp_path / "config.yaml", {"accounts_dir": "missing.d"})
    assert _error(conf) == [f"{conf}: accounts_dir: directory not found: {tmp_path / 'missing.d'}"]
    (tmp_path / "missing.d").mkdir()
    assert _error(conf) == [f"{conf}: accounts_dir: at least one account is required"]
    _write(tmp_path / "file.d", "x")
    conf.write_text("accounts_dir: file.d\n")
    assert _error(conf) == [f"{conf}: accounts_dir: not a directory: {tmp_path / 'file.d'}"]
    conf.write_text("binance: {}\n")
    assert _error(conf) == [
        f"{conf}: accounts: required (a list of at least one account, or accounts_dir)"
    ]


#: accounts_dir with this many files is read and checked within BUDGET_SECONDS (issue 22)
MANY = 500
BUDGET_SECONDS = 2.0


@pytest.mark.bench  # a timed figure the README promises
def test_five_hundred_account_files_are_read_and_checked_in_under_two_seconds(
    tmp_path: Path,
) -> None:
    accounts = tmp_path / "accounts.d"
    accounts.mkdir()
    for i in range(MANY):
        name = f"desk-{i:03d}"
        (accounts / f"{name}.yaml").write_text(
            f"name: {name}\napi_key: key-{i:03d}\napi_secret_file: {name}.secret\n"
            f"labels: {{desk: d{i % 7}, team: t{i % 3}}}\n"
            "thresholds: {uni_mmr_warning: 1.4, uni_mmr_critical: 1.15}\n"
        )
        (accounts / f"{name}.secret").write_text(f"secret-{i:03d}\n")
    conf = _write(tmp_path / "config.yaml", {"accounts_dir": "accounts.d"})
    load_checked(conf, {})  # warm: imports, the page cache
    started = time.perf_counter()
    config = load_checked(conf, {})
    elapsed = time.perf_counter() - started
    assert len(config.accounts) == MANY
    assert config.accounts[-1].labels == {"desk": "d2", "team": "t1"}
    print(f"{MANY} account files read and checked in {elapsed:.3f} s")
    assert elapsed < BUDGET_SECONDS, f"{MANY} account files took {elapsed:.2f} s"


# ---- a reload picks up added and removed files --------------------------------------


LAST = "binance_pm_last_success_timestamp_seconds"


def _series_of(text: str, account: str) -> dict[str, str]:
    """The account's series that a reload of other files must leave as they are:
    name{labels} -> value, the moving ones (times, counters) left out."""
    moving = (LAST, "binance_pm_balance_update_timestamp_seconds", "binance_pm_account_update")
    series = {}
    for line in text.splitlines():
        if f'account="{account}"' in line and not line.startswith(("#", *moving)):
            name, _, value = line.rpartition(" ")
            series[name] = value
    return series


@pytest.fixture
def sim_dir(tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, dict[str, str]]]]:
    names = ["acct-a", "acct-b", "acct-c"]
    sims, entries = hmac_accounts(names)
    with Simulator(sims, ip_weight_limit=10**6, assets_per_account=3) as simulator:
        conf = _write(
            tmp_path / "config.yaml",
            {
                "binance": {"base_url": simulator.url, "timeout_seconds": 2},
                "prices": {"enabled": False},
                "stream": {"enabled": False},
                "budget": {
                    "ip_weight_limit_per_minute": 100_000,
                    "share": 1.0,
                    "min_interval_seconds": 1,
                },
                "accounts_dir": "accounts.d",
            },
        )
        yield conf, tmp_path / "accounts.d", {e["name"]: e for e in entries}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_reload_adds_and_removes_account_files_and_leaves_the_others(
    sim_dir: tuple[Path, Path, dict[str, dict[str, str]]],
) -> None:
    conf, accounts, entries = sim_dir
    _write(accounts / "acct-a.yaml", {**entries["acct-a"], "labels": {"desk": "mm"}})
    _write(accounts / "acct-b.yaml", entries["acct-b"])
    with running("--config.file", str(conf), "--web.enable-lifecycle") as run:
        for name in ("acct-a", "acct-b"):
            wait_until(lambda n=name: run.sample("binance_pm_up", account=n) == 1.0, 20, name)
        before = _series_of(run.get("/metrics").text, "acct-a")
        assert before['binance_pm_account_info{account="acct-a",desk="mm"}'] == "1.0"
        last_before = run.sample(LAST, account="acct-a") or 0.0

        # acct-c's file added, acct-b's removed; acct-a's untouched
        _write(accounts / "acct-c.yaml", {**entries["acct-c"], "labels": {"desk": "treasury"}})
        (accounts / "acct-b.yaml").unlink()
        run.signal(signal.SIGHUP)
        (event,) = run.logged("config_reloaded", 20)
        assert event["added"] == ["acct-c"]
        assert event["removed"] == ["acct-b"]
        assert event["changed"] == []
        wait_until(lambda: run.sample("binance_pm_up", account="acct-c") == 1.0, 20, "acct-c")
        text = run.get("/metrics").text
        assert 'account="acct-b"' not in text  # its series left /metrics
        assert 'binance_pm_account_info{account="acct-c",desk="treasury"} 1.0' in text
        # acct-a kept its series, and its refreshes went on (no reset, no gap to fill)
        assert _series_of(text, "acct-a") == before
        assert (run.sample(LAST, account="acct-a") or 0.0) >= last_before
        assert run.sample("binance_pm_config_last_reload_successful") == 1.0

        # A duplicate name across files: the reload (POST /-/reload this time) fails,
        # naming both files; nothing changes.
        _write(accounts / "zz-copy.yaml", entries["acct-a"])
        duplicate = (
            f"{accounts / 'zz-copy.yaml'}: duplicate account name 'acct-a'"
            f" (also in {accounts / 'acct-a.yaml'})"
        )
        response = httpx.post(run.url + "/-/reload", timeout=30)
        assert response.status_code == 500
        assert response.text == f"failed to reload config: {duplicate}\n"
        (failed,) = run.logged("reload_failed")
        assert failed["error"] == duplicate
        assert run.sample("binance_pm_config_last_reload_successful") == 0.0
        assert entries["acct-a"]["api_secret"] not in "\n".join(run.lines)
        assert run.sample("binance_pm_up", account="acct-c") is not None
        assert run.stop() == 0


def test_check_config_lists_the_directorys_accounts_with_labels_and_thresholds(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    accounts = conf.parent / "accounts.d"
    _write(
        accounts / "mm.yaml",
        _account("mm-1", labels={"team": "eu", "desk": "mm"}, thresholds={"uni_mmr_critical": 1.1}),
    )
    assert main(["--config.file", str(conf), "--check-config"], environ={}) == 0
    out = capsys.readouterr().out
    assert f"accounts (2), with those of {accounts}/*.yaml:\n" in out
    assert "  inline  hmac     egress=default\n" in out
    assert (
        "  mm-1    hmac     egress=default  labels desk=mm,team=eu  thresholds uni_mmr_critical=1.1"
        in out
    )
    assert "s3cr3t" not in out
