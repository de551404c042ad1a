"""The metrics endpoint, on a real socket: /metrics only, bounded, never stuck."""

from __future__ import annotations

import gzip
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from service.observability.metrics_http import MAX_CONNECTIONS, MetricsServer


@pytest.fixture
def endpoint() -> object:
    registry = CollectorRegistry()
    Counter("cnnserve_test", "A counter.", registry=registry).inc()
    with MetricsServer.serving(registry, "127.0.0.1", 0) as server:
        yield server


def get(server: MetricsServer, path: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_metrics_are_served_and_every_other_path_is_404(endpoint: MetricsServer) -> None:
    status, body, headers = get(endpoint, "/metrics")
    assert status == 200 and b"cnnserve_test_total 1.0" in body
    assert headers["Content-Type"].startswith("text/plain")
    for path in ("/", "/v2/health/ready", "/metrics/x", "/healthz"):
        assert get(endpoint, path)[0] == 404, path
    _, zipped, headers = get(endpoint, "/metrics", **{"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and b"cnnserve_test" in gzip.decompress(zipped)
    _, openmetrics, headers = get(endpoint, "/metrics",
                                  Accept="application/openmetrics-text; version=1.0.0")
    assert "openmetrics" in headers["Content-Type"] and openmetrics.endswith(b"# EOF\n")


def test_other_methods_get_405(endpoint: MetricsServer) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{endpoint.port}/metrics", data=b"x",
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 405


def test_half_open_connections_neither_pile_up_nor_block_a_scrape(
        endpoint: MetricsServer) -> None:
    held = []
    for _ in range(MAX_CONNECTIONS + 20):  # more than it keeps: the oldest are closed
        sock = socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        held.append(sock)
    closed = 0
    for sock in held[:20]:
        sock.settimeout(5)
        try:
            closed += sock.recv(1) == b""
        except ConnectionResetError:  # closed with the request unread
            closed += 1
    assert closed == 20
    assert endpoint.connections == MAX_CONNECTIONS
    # While the attacker still holds every connection, a scrape is answered.
    assert get(endpoint, "/metrics")[0] == 200
    for sock in held:
        sock.close()


def test_a_malformed_request_gets_400_and_the_connection_closes(
        endpoint: MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400")
