"""Sharding: rendezvous hashing of account names, the flag, and three processes on loopback."""

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import metrics
from support.harness import sim_config
from support.waits import wait_until

from exporter.app import Exporter
from exporter.cli import main
from exporter.shard import Shard, ShardError, assign, owner, parse_shard
from exporter.simulator import Simulator
from exporter.simulator.cli import write_config
from exporter.simulator.demo import exporter_config, generate_account

NAMES = [f"desk-{i:04d}" for i in range(2000)]


@pytest.mark.parametrize("total", [1, 2, 3, 5, 8])
def test_shards_cover_every_account_exactly_once(total: int) -> None:
    shards = [Shard(i, total).select(NAMES, str) for i in range(total)]
    assert sorted(name for shard in shards for name in shard) == sorted(NAMES)
    sizes = [len(s) for s in shards]
    assert min(sizes) > len(NAMES) / total * 0.8  # and roughly evenly


@pytest.mark.parametrize("total", [1, 2, 4, 9])
def test_adding_a_shard_moves_about_one_in_total_plus_one(total: int) -> None:
    before, after = assign(NAMES, total), assign(NAMES, total + 1)
    moved = [name for name in NAMES if before[name] != after[name]]
    assert all(after[name] == total for name in moved)  # only to the new shard
    share = len(moved) / len(NAMES)
    assert abs(share - 1 / (total + 1)) < 0.04, share


def test_the_hash_is_stable_across_processes_and_versions() -> None:
    # sha256, not Python's salted hash(): these stay the same forever.
    assert [owner(name, 5) for name in ("desk-a", "desk-b", "desk-c", "sim-00")] == [2, 4, 2, 3]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0/1", Shard(0, 1)),
        ("2/5", Shard(2, 5)),
        (" 4/5 ", Shard(4, 5)),
        ("binance-pm-exporter-2/5", Shard(2, 5)),
        ("web-0/3", Shard(0, 3)),
    ],
)
def test_parse_shard(text: str, expected: Shard) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5/5", "INDEX must be 0..4"),
        ("0/0", "TOTAL must be"),
        ("1", "expected INDEX/TOTAL"),
        ("-1/3", "expected INDEX/TOTAL"),
        ("pod/3", "expected INDEX/TOTAL"),
        ("a-b/3", "expected INDEX/TOTAL"),
    ],
)
def test_parse_shard_rejects(text: str, message: str) -> None:
    with pytest.raises(ShardError, match=message):
        parse_shard(text)


def test_bad_shard_flag_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--shard", "3/2"], environ={}) == 2
    err = capsys.readouterr().err
    assert err == "binance-pm-exporter: --shard: INDEX must be 0..1, got 3\n"


def test_check_config_names_the_shards_accounts_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generated = [generate_account(f"desk-{c}", "hmac") for c in "abcdef"]
    path = tmp_path / "config.yaml"
    write_config(path, exporter_config("http://127.0.0.1:1", generated))
    env = {"BINANCE_PM_EXPORTER_SHARD": "exporter-1/3"}
    assert main(["--config.file", str(path), "--check-config"], environ=env) == 0
    mine = [name for name in (f"desk-{c}" for c in "abcdef") if owner(name, 3) == 1]
    assert (
        f"shard 1/3: budget B / 3 = 500 weight/min per egress IP; "
        f"{len(mine)} of 6 accounts: {', '.join(mine)}"
    ) in capsys.readouterr().out


def test_each_shard_spends_its_part_of_the_budget_at_the_same_interval() -> None:
    generated = [generate_account(f"desk-{i:02d}", "hmac") for i in range(30)]
    config = sim_config("http://127.0.0.1:1", generated, {"share": 0.5})
    whole = Exporter(config)
    parts = [Exporter(config, shard=Shard(i, 3)) for i in range(3)]
    assert sum(len(p.accounts) for p in parts) == 30
    assert whole.budgets[0].settings.per_minute == 3000
    for part in parts:
        (budget,) = part.budgets
        assert budget.settings.per_minute == pytest.approx(1000)
        # n accounts on B/3: n·w/(B/3), which is the whole's N·w/B when n = N/3
        expected = whole.pollers[0].settings.interval * len(part.accounts) * 3 / 30
        assert part.pollers[0].settings.interval == pytest.approx(expected)


# ---------------------------------------------------------------- processes


def _listening_port(log: Path) -> int | None:
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "listening":
            return int(event["address"].rsplit(":", 1)[1])
    return None


def up_accounts(url: str) -> list[str]:
    text = httpx.get(f"{url}/metrics").text
    (family,) = (f for f in text_string_to_metric_families(text) if f.name == "binance_pm_up")
    return [s.labels["account"] for s in family.samples]


SHARDS = 3


@pytest.mark.slow
def test_three_processes_together_show_every_account_exactly_once(tmp_path: Path) -> None:
    """The --shard flag as a StatefulSet passes it, in processes of their own: three, not
    more, as each is an interpreter starting on a loaded machine (the hashing at 5 and 8
    shards is checked above, in-process)."""
    generated = [generate_account(f"desk-{i:02d}", "hmac") for i in range(23)]
    limit = 100_000  # every account refreshed within a second, so the test is quick
    with Simulator([g.sim_account for g in generated], ip_weight_limit=limit) as sim:
        data = exporter_config(
            sim.url, generated, budget={"ip_weight_limit_per_minute": limit, "share": 0.5}
        )
        data["budget"]["min_interval_seconds"] = 1
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(data))
        processes, logs = [], []
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        try:
            for index in range(SHARDS):
                logs.append(tmp_path / f"shard-{index}.log")
                with logs[-1].open("w") as stderr:
                    processes.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "exporter", "--config.file", str(config),
                             "--web.listen-address", "127.0.0.1:0", "--log.format", "json",
                             "--shard", f"binance-pm-exporter-{index}/{SHARDS}"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr,
                        )
                    )  # fmt: skip
            # three interpreters starting at once on a loaded 2-core machine: a generous deadline
            wait_until(
                lambda: all(_listening_port(log) for log in logs),
                timeout=60,
                what="every shard listening",
            )
            urls = [f"http://127.0.0.1:{_listening_port(log)}" for log in logs]
            wait_until(
                lambda: all(httpx.get(f"{u}/readyz").status_code == 200 for u in urls),
                timeout=60,
                what="every shard ready",
            )
            shown = [up_accounts(url) for url in urls]
            budgets = [httpx.get(f"{url}/metrics").text for url in urls]
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            codes = [process.wait(15) for process in processes]
        clients = Counter(r.account for r in sim.requests if r.account is not None)
    assert codes == [0] * SHARDS
    everyone = Counter(name for names in shown for name in names)
    assert everyone == Counter(g.sim_account.name for g in generated)  # each exactly once
    for index, names in enumerate(shown):
        assert names == sorted(n for n in everyone if owner(n, SHARDS) == index)
    assert set(clients) == set(everyone)  # and each was polled, by its shard alone
    for text in budgets:  # B / 3 each: 100,000 x 0.5 / 3
        shown = metrics.sample(text, "binance_pm_weight_budget_per_minute", egress="default")
        assert shown == pytest.approx(limit * 0.5 / SHARDS)


def test_too_many_shards_for_the_budget_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    data = exporter_config("http://127.0.0.1:1", [generate_account("desk-a", "hmac")])
    data["budget"] = {"share": 0.01}  # B = 60: one refresh (40) a minute, not two shards
    write_config(path, data)
    assert main(["--config.file", str(path), "--check-config", "--shard", "0/1"], environ={}) == 0
    capsys.readouterr()
    assert main(["--config.file", str(path), "--shard", "1/2"], environ={}) == 2
    assert capsys.readouterr().err == (
        "binance-pm-exporter: --shard: each of 2 shards may spend budget B / 2 = 30 weight/min, "
        "less than one account refresh (40); use fewer shards or a larger budget.share\n"
    )
