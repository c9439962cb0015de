"""The config's per-account labels and thresholds (with the snapshot, in the cached
exposition) and the process's own resources (on the served registry): the series the
alert rules join on and compare with."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString
from support.harness import accounts, reference_registry, sim_config

from exporter.app import Exporter
from exporter.processmetrics import MemoryLimitCollector, memory_limit_file, read_memory_limit
from exporter.snapshot import AccountMeta, AccountSnapshot, SnapshotStore

URL = "http://127.0.0.1:1"


def _exporter() -> Exporter:
    extra = {
        "acct-00": {
            "labels": {"desk": "mm", "team": "alpha"},
            "thresholds": {"uni_mmr_warning": 2},
        },
        "acct-01": {"labels": {"desk": "treasury"}},
    }
    return Exporter(sim_config(URL, accounts(3), extra=extra, stream_url="ws://127.0.0.1:1/pm"))


def _lines(registry: CollectorRegistry, *prefixes: str) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if line.startswith(prefixes)]


INFO_AND_THRESHOLDS = [
    'binance_pm_account_info{account="acct-00",desk="mm",team="alpha"} 1.0',
    'binance_pm_account_info{account="acct-01",desk="treasury"} 1.0',
    # an account without labels has its info series too: a join never drops it
    'binance_pm_account_info{account="acct-02"} 1.0',
    'binance_pm_account_threshold{account="acct-00",threshold="uni_mmr_warning"} 2.0',
]


def test_account_info_and_thresholds_come_with_the_snapshot() -> None:
    exporter = _exporter()
    wanted = ("binance_pm_account_info", "binance_pm_account_threshold")
    assert _lines(reference_registry(exporter), *wanted) == INFO_AND_THRESHOLDS
    # the cached exposition /metrics serves writes the same lines
    cached = exporter.exposition.text("text").decode().splitlines()
    assert [line for line in cached if line.startswith(wanted)] == (INFO_AND_THRESHOLDS)


def test_a_label_sorting_before_account_is_written_in_order() -> None:
    extra = {"acct-00": {"labels": {"aa": "x", "zz": 'q"uote'}}}
    exporter = Exporter(sim_config(URL, accounts(1), extra=extra))
    want = 'binance_pm_account_info{aa="x",account="acct-00",zz="q\\"uote"} 1.0'
    assert _lines(reference_registry(exporter), "binance_pm_account_info{") == [want]
    cached = exporter.exposition.text("text").decode().splitlines()
    assert [line for line in cached if line.startswith("binance_pm_account_info{")] == [want]


def test_a_refresh_begun_before_a_reload_keeps_the_reloads_labels() -> None:
    old, new = AccountMeta(labels=(("desk", "a"),)), AccountMeta(labels=(("desk", "b"),))
    store = SnapshotStore([AccountSnapshot("acct", 10.0, meta=old)])
    refreshing = store.get("acct")  # a refresh starts from this
    store.rebuild(lambda current: [replace(current["acct"], meta=new)])  # the reload
    store.replace(replace(refreshing, up=True))  # the refresh ends
    assert store.get("acct").up is True
    assert store.get("acct").meta is new


def test_process_metrics_are_served_under_their_usual_names() -> None:
    names = {line.split("{")[0].split(" ")[0] for line in _lines(_exporter().registry, "p")}
    assert {
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_collections_total",
    } <= names


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_check_metrics_is_silent() -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=generate_latest(_exporter().registry),
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert result.stderr == b""


# ---- the memory limit, from the cgroup -------------------------------------------------


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    cgroup = tmp_path / "proc_self_cgroup"
    cgroup.write_text(proc)
    return root, cgroup


@pytest.mark.parametrize(
    ("proc", "files", "limit"),
    [
        # cgroup v2, a systemd unit
        (
            "0::/system.slice/exporter.service\n",
            {"system.slice/exporter.service/memory.max": "268435456\n"},
            268435456.0,
        ),
        # cgroup v2 in a container's namespace: its cgroup is the root of the mount
        ("0::/\n", {"memory.max": "268435456\n"}, 268435456.0),
        ("0::/\n", {"memory.max": "max\n"}, None),
        # cgroup v1, and its "no limit"
        (
            "4:memory:/kubepods/pod1\n0::/\n",
            {"memory/kubepods/pod1/memory.limit_in_bytes": "134217728\n"},
            134217728.0,
        ),
        ("4:memory:/x\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
        ("0::/\n", {}, None),
    ],
)
def test_memory_limit_from_the_cgroup(
    tmp_path: Path, proc: str, files: dict[str, str], limit: float | None
) -> None:
    root, cgroup = _cgroup(tmp_path, proc, files)
    path = memory_limit_file(root, cgroup)
    assert read_memory_limit(path) == limit
    registry = CollectorRegistry()
    registry.register(MemoryLimitCollector(path))
    name = "binance_pm_exporter_memory_limit_bytes"
    expected = [] if limit is None else [f"{name} {floatToGoString(limit)}"]
    assert _lines(registry, "binance_pm_exporter_memory") == expected
