"""The cached exposition: byte-identical to prometheus_client's, once per generation."""

import gzip
import re
import subprocess
import threading
import zlib
from collections import Counter
from types import MappingProxyType

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from support.harness import RunningExporter, reference_registry, sim_config
from support.systools import require
from support.waits import wait_until

from exporter import fields
from exporter.collector import SnapshotCollector
from exporter.exposition import CachedExposition
from exporter.simulator import Simulator
from exporter.simulator.demo import generate_account
from exporter.snapshot import AccountInfo, AccountSnapshot, AssetBalance, SnapshotStore

BALANCE_FIELDS = [f.api for f in fields.BALANCE]
VALUES = [0.0, -0.0, 1.0, -1.5, 0.1, 1e-9, 123456.789, 1234567.0, 1e22, -3.3e-300, 17e9]


def reference(store: SnapshotStore, fmt: str = "text") -> bytes:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(store))
    if fmt == "text":
        return generate_latest(registry)
    return openmetrics.generate_latest(registry)


def account(
    name: str, assets: list[str], *, seed: int = 0, status: str = "NORMAL"
) -> AccountSnapshot:
    balances = tuple(
        AssetBalance(
            asset,
            MappingProxyType(
                {f: VALUES[(i + j + seed) % len(VALUES)] for j, f in enumerate(BALANCE_FIELDS[:-1])}
            ),
            1_700_000_000.123 + i,
        )
        for i, asset in enumerate(assets)
    )
    info = AccountInfo(MappingProxyType({"uniMMR": 5.25, "accountEquity": 1e7}), status, 1.7e9)
    return AccountSnapshot(name, 16.0, balances, info, up=True, attempted=True, last_success=1.7e9)


def tricky_store() -> SnapshotStore:
    return SnapshotStore(
        [
            account("desk-a", ["USDT", "BTC", 'Q"UOTE', "BACK\\SLASH", "NEW\nLINE", "ÜNÏ"]),
            account("desk-b", ["ETH"], seed=3, status="SOMETHING_NEW"),
            AccountSnapshot("desk-c", 10.0, attempted=True, consecutive_failures=2),
        ]
    )


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_cached_text_equals_prometheus_client(fmt: str) -> None:
    store = tricky_store()
    cached = CachedExposition(store).text(fmt)  # type: ignore[arg-type]
    expected = reference(store, fmt)
    if fmt == "openmetrics":
        expected = expected.removesuffix(b"# EOF\n")
    assert cached == expected


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_gzip_is_one_member_of_the_same_bytes_plus_the_live_tail(fmt: str) -> None:
    store = tricky_store()
    exposition = CachedExposition(store)
    tail = b"# HELP live x\n# TYPE live gauge\nlive 1.0\n"
    body = b"".join(exposition.gzip(fmt).finish(tail))  # type: ignore[arg-type]
    plain = exposition.text(fmt) + tail  # type: ignore[arg-type]
    assert gzip.decompress(body) == plain
    single = zlib.decompressobj(zlib.MAX_WBITS | 16)  # what httpx and browsers use: one member
    assert single.decompress(body) == plain
    assert single.eof
    assert single.unused_data == b""


def test_rendered_once_per_generation_and_only_changed_accounts() -> None:
    store = tricky_store()
    exposition = CachedExposition(store)
    first = exposition.chunks("text")
    assert exposition.chunks("text") is first
    assert exposition.chunks("openmetrics") is first  # the same headers: the same body
    assert exposition.renders == 1
    fragments = dict(exposition._fragments)
    store.replace(account("desk-b", ["ETH", "SOL"], seed=5))
    second = exposition.text("text")
    assert exposition.renders == 2
    assert second == reference(store)
    assert exposition._fragments["desk-a"] is fragments["desk-a"]
    assert exposition._fragments["desk-b"] is not fragments["desk-b"]
    exposition.gzip("text")
    exposition.gzip("text")
    assert exposition.renders == 3


def test_changes_across_blocks_keep_every_variant_equal_to_prometheus_client() -> None:
    # 40 accounts: three blocks of BLOCK_ACCOUNTS; changes in one, then a reload that
    # removes an account (every later block shifts) and adds one.
    store = SnapshotStore([account(f"desk-{i:02d}", ["USDT", "BTC"], seed=i) for i in range(40)])
    exposition = CachedExposition(store)
    tail = b"# EOF\n"

    def check() -> None:
        for fmt in ("text", "openmetrics"):
            plain = reference(store, fmt).removesuffix(tail)
            assert exposition.text(fmt) == plain  # type: ignore[arg-type]
            body = b"".join(exposition.gzip(fmt).finish(tail))  # type: ignore[arg-type]
            assert gzip.decompress(body) == plain + tail

    exposition.text("text")  # blocks made before gzip is asked for: compressed later
    check()
    store.replace(account("desk-17", ["ETH"], seed=99))
    check()
    store.replace(account("desk-03", ["USDT", "SOL", "BTC"], seed=7))
    store.replace(account("desk-39", [], seed=1))
    check()
    kept = [a for name, a in store.current.accounts.items() if name != "desk-05"]
    store.rebuild(lambda _: [*kept, account("desk-40", ["BNB"], seed=4)])
    check()


def test_concurrent_scrapes_of_a_new_generation_render_it_once() -> None:
    store = tricky_store()
    exposition = CachedExposition(store)
    exposition.text("text")
    store.replace(account("desk-a", ["USDT"], seed=1))
    start = threading.Barrier(8)
    results: list[tuple[bytes, ...]] = []

    def scrape() -> None:
        start.wait()
        results.append(exposition.chunks("text"))

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert exposition.renders == 2
    assert len({id(r) for r in results}) == 1


label_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    assets=st.lists(label_text, min_size=1, max_size=4, unique=True),
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=11),
)
def test_any_label_value_and_float_render_as_prometheus_client_does(
    assets: list[str], values: list[float]
) -> None:
    balances = tuple(
        AssetBalance(a, MappingProxyType(dict(zip(BALANCE_FIELDS, values, strict=False))), None)
        for a in assets
    )
    store = SnapshotStore([AccountSnapshot("x", 1.0, balances, up=True, attempted=True)])
    assert CachedExposition(store).text("text") == reference(store)


# ---------------------------------------------------------------- a real exporter


def samples(text: str) -> Counter[tuple[str, tuple[tuple[str, str], ...], float]]:
    return Counter(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )


#: the process's own resources move between two renderings even when polling stopped
#: (under each escaping: python__gc__..., U__process__...)
MOVING = re.compile(r"(U__)?(process|python_+gc)_")


def steady(text: str) -> str:
    """`text` without the samples of the process's own resources."""
    return "".join(line for line in text.splitlines(keepends=True) if not MOVING.match(line))


def steady_lines(text: str) -> list[str]:
    return sorted(steady(text).splitlines())


#: what Prometheus 3 sends, and the name escapings prometheus_client knows (dots renames)
ESCAPINGS = [
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;"
    "escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "application/openmetrics-text; version=1.0.0; escaping=dots",
    "application/openmetrics-text; version=1.0.0; escaping=values",
    "text/plain; version=1.0.0; escaping=underscores",
    "text/plain; version=1.0.0; escaping=dots",
]


@pytest.mark.slow
def test_a_real_exporters_metrics_equal_the_full_registry_and_pass_promtool() -> None:
    generated = [generate_account(f"desk-{i}", "hmac") for i in range(3)]
    om_accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    with Simulator([g.sim_account for g in generated], assets_per_account=4) as sim:
        config = sim_config(sim.url, generated, {"share": 1.0, "min_interval_seconds": 1})
        # What this compares is content, not speed: the server's threads run at nice 10,
        # and a machine busy at nice 0 (CI beside stress --cpu 2 and four test workers)
        # stretched one of these small scrapes past httpx's default 5 s.
        with RunningExporter(config) as running, httpx.Client(timeout=60) as scrape:
            exporter = running.exporter
            wait_until(lambda: not exporter.store.current.pending, what="every account refreshed")
            wait_until(lambda: exporter.price_store.current.fetched, what="prices fetched")
            polling = scrape.get(f"{running.url}/metrics").text
            assert 'binance_pm_up{account="desk-0"} 1.0' in polling
            assert 'binance_pm_asset_price_usd{asset="BTC"} 65000.0' in polling
            running.stop_polling()
            # Stopped: nothing moves any more, so both renderings see the same values.
            everything = reference_registry(exporter)
            expected = generate_latest(everything).decode()
            identity = {"Accept-Encoding": "identity"}
            text = scrape.get(f"{running.url}/metrics", headers=identity).text
            zipped = scrape.get(
                f"{running.url}/metrics", headers={**om_accept, "Accept-Encoding": "gzip"}
            )
            by_accept = {
                accept: scrape.get(f"{running.url}/metrics", headers={"Accept": accept})
                for accept in ESCAPINGS
            }
    assert samples(steady(text)) == samples(steady(expected))
    assert steady_lines(text) == steady_lines(expected)
    assert zipped.headers["content-encoding"] == "gzip"
    om = zipped.text
    expected_om = openmetrics.generate_latest(everything).decode()
    assert steady_lines(om) == steady_lines(expected_om)
    assert om.endswith("\n# EOF\n")
    assert om.count("# EOF") == 1
    for accept, response in by_accept.items():
        encoder, content_type = choose_encoder(accept)
        assert response.headers["content-type"] == content_type
        want = encoder(everything).decode()
        assert steady_lines(response.text) == steady_lines(want), accept
    types = [line.split()[2] for line in om.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    result = subprocess.run(
        [require("promtool"), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        check=False,
    )
    assert result.stdout + result.stderr == b""
    assert result.returncode == 0
