"""The HTTP endpoints, over real loopback HTTP."""

import base64
import gzip
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest
from harness import wait_until
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter.exposition import CachedExposition
from exporter.http import (
    ExporterApp,
    MetricsServer,
    ServerLimits,
    cacheable_format,
    gzip_accepted,
    parse_listen_address,
)
from exporter.snapshot import AccountSnapshot, SnapshotStore
from exporter.webconfig import load_web_config


@pytest.fixture
def store() -> SnapshotStore:
    return SnapshotStore([AccountSnapshot("desk-a", 10.0), AccountSnapshot("desk-b", 10.0)])


@pytest.fixture
def url(store: SnapshotStore, tmp_path: Path) -> Iterator[str]:
    hashed = bcrypt.hashpw(b"scrape-password", bcrypt.gensalt(rounds=4)).decode()
    web_config = tmp_path / "web.yml"
    web_config.write_text(
        f"basic_auth_users:\n  prom: '{hashed}'\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
    )
    web = load_web_config(web_config)
    app = ExporterApp(CollectorRegistry(), store, web, exposition=CachedExposition(store))
    server = MetricsServer(app, "127.0.0.1", 0)
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.close()


AUTH = {"Authorization": "Basic " + base64.b64encode(b"prom:scrape-password").decode()}


def test_metrics_text_openmetrics_and_gzip(url: str) -> None:
    plain = httpx.get(f"{url}/metrics", headers=AUTH)
    assert plain.status_code == 200
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'binance_pm_up{account="desk-a"} 0.0' in plain.text
    assert plain.headers["x-content-type-options"] == "nosniff"
    om = httpx.get(
        f"{url}/metrics", headers={**AUTH, "Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    zipped = httpx.get(f"{url}/metrics", headers={**AUTH, "Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.text == plain.text  # httpx decodes it
    raw = httpx.Client().send(
        httpx.Request("GET", f"{url}/metrics", headers={**AUTH, "Accept-Encoding": "gzip"}),
        stream=True,
    )
    assert gzip.decompress(b"".join(raw.iter_raw())) == plain.content
    raw.close()


def test_readyz_names_pending_accounts_until_each_has_been_refreshed(
    url: str, store: SnapshotStore
) -> None:
    response = httpx.get(f"{url}/readyz")  # outside basic auth, for probes: a count, no names
    assert response.status_code == 503
    assert response.json() == {"status": "pending", "pending": 2}
    store.replace(AccountSnapshot("desk-a", 10.0, up=True, attempted=True))
    store.replace(AccountSnapshot("desk-b", 10.0, up=False, attempted=True))
    response = httpx.get(f"{url}/readyz")
    assert response.status_code == 200
    assert json.loads(response.text) == {"status": "ready"}


def test_landing_healthz_404_405_and_auth(url: str) -> None:
    assert 'href="metrics"' in httpx.get(url, headers=AUTH).text
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no credentials
    assert httpx.get(f"{url}/nope", headers=AUTH).status_code == 404
    post = httpx.post(f"{url}/metrics", headers=AUTH)
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"
    denied = httpx.get(f"{url}/metrics", auth=("prom", "wrong"))
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"].startswith("Basic")
    assert "binance_pm" not in denied.text
    head = httpx.head(f"{url}/metrics", headers=AUTH)
    assert head.status_code == 200
    assert head.content == b""


def test_a_client_that_disconnects_mid_request_harms_nothing(url: str) -> None:
    host, port = parse_listen_address(url.removeprefix("http://"))
    for _ in range(20):
        with socket.create_connection((host, port)) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
    with socket.create_connection((host, port)) as sock:
        auth = AUTH["Authorization"].encode()
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth + b"\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        sock.recv(10)  # read a little, then hang up mid-response
    assert httpx.get(f"{url}/metrics", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (":9745", ("", 9745)),
        ("0.0.0.0:9745", ("0.0.0.0", 9745)),
        ("[::]:9745", ("::", 9745)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:9", ("::1", 9)),
    ],
)
def test_parse_listen_address(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(value) == expected


@pytest.mark.parametrize("value", ["9745", "host:", "host:99999", "host:x"])
def test_parse_listen_address_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="not HOST:PORT"):
        parse_listen_address(value)


@pytest.mark.parametrize(
    ("header", "gzipped"),
    [
        ("gzip", True),
        ("GZIP", True),
        ("gzip;q=0", False),
        ("gzip; Q=0.000", False),
        ("gzipx", False),
        ("notgzipatall", False),
        ("identity, gzip;q=0.5", False),
        ("identity;q=0.5, gzip", True),
        ("*", True),
        ("*;q=0", False),
        ("*, gzip;q=0", False),
        ("br, *;q=0.1", True),
        ("x-gzip", True),
        ("gzip;q=abc", False),
        ("", False),
    ],
)
def test_accept_encoding_is_parsed_by_its_grammar(header: str, gzipped: bool) -> None:
    assert gzip_accepted(header) is gzipped


@pytest.mark.parametrize(
    ("content_type", "fmt"),
    [
        ("text/plain; version=0.0.4; charset=utf-8", "text"),
        ("text/plain; version=1.0.0; charset=utf-8; escaping=underscores", "text"),
        ("text/plain; version=1.0.0; charset=utf-8; escaping=values", None),
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=allow-utf-8",
            "openmetrics",
        ),
        ("application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=dots", None),
    ],
)
def test_only_escapings_that_keep_our_names_are_served_from_the_cache(
    content_type: str, fmt: str | None
) -> None:
    assert cacheable_format(content_type) == fmt


def test_auth_comes_before_routing_and_errors_are_plain_text(url: str) -> None:
    for path in ("/nope", "/metrics", "/"):
        denied = httpx.get(f"{url}{path}")
        assert denied.status_code == 401
        assert denied.headers["content-type"] == "text/plain; charset=utf-8"
    assert httpx.post(f"{url}/nope").status_code == 401
    missing = httpx.get(f"{url}/nope", headers=AUTH)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "text/plain; charset=utf-8"
    assert missing.headers["x-content-type-options"] == "nosniff"  # the web config's too
    for response in (missing, httpx.get(f"{url}/metrics", headers=AUTH)):
        assert "server" not in response.headers


def _serve(limits: ServerLimits, registry: CollectorRegistry | None = None) -> MetricsServer:
    store = SnapshotStore([AccountSnapshot("desk-a", 10.0)])
    app = ExporterApp(registry or CollectorRegistry(), store)
    server = MetricsServer(app, "127.0.0.1", 0, limits=limits)
    server.start()
    return server


def _closed_unanswered(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_a_request_not_finished_within_the_header_deadline_is_dropped_unanswered() -> None:
    server = _serve(ServerLimits(read_header_timeout=0.3))
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            for _ in range(3):  # trickling does not extend the deadline
                sock.sendall(b"X-A: b\r\n")
            assert _closed_unanswered(sock, within=10)
    finally:
        server.close()


def test_headers_past_the_cap_get_431() -> None:
    server = _serve(ServerLimits(max_header_bytes=1024))
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            # Past the cap, yet all read by the server: no unread bytes to reset the answer.
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 1200 + b"\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 431 ")
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200
    finally:
        server.close()


def test_past_max_connections_the_longest_waiting_connection_makes_room() -> None:
    server = _serve(ServerLimits(max_connections=5))
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
        for sock in idle:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200
        assert _closed_unanswered(idle[0], within=10)
        for sock in idle:
            sock.close()
    finally:
        server.close()


class _Huge(Collector):
    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("huge", "x" * (32 * 1024 * 1024), value=1)


def test_metrics_requests_past_max_requests_get_503() -> None:
    registry = CollectorRegistry()
    registry.register(_Huge())
    server = _serve(ServerLimits(max_requests=1), registry)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as reader:
            # 32 MB it does not read: its request stays in flight while the socket is full.
            reader.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            reader.recv(1)
            busy = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
            assert busy.status_code == 503
            assert busy.text == "too many requests in flight\n"
            assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200
    finally:
        server.close()


def test_a_changed_snapshot_is_rendered_before_the_next_scrape_asks() -> None:
    store = SnapshotStore([AccountSnapshot("desk-a", 10.0), AccountSnapshot("desk-b", 10.0)])
    exposition = CachedExposition(store)
    server = MetricsServer(
        ExporterApp(CollectorRegistry(), store, exposition=exposition), "127.0.0.1", 0
    )
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        assert httpx.get(url, headers={"Accept-Encoding": "gzip"}).status_code == 200
        built = exposition.renders
        store.replace(AccountSnapshot("desk-a", 10.0, up=True, attempted=True))
        wait_until(lambda: exposition.renders > built, timeout=10, what="the body built ahead")
        rendered = exposition.renders
        scrape = httpx.get(url, headers={"Accept-Encoding": "gzip"})
        assert 'binance_pm_up{account="desk-a"} 1.0' in scrape.text
        assert exposition.renders == rendered  # the scrape found its body ready
    finally:
        server.close()
