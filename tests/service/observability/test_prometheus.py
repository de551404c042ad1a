"""A real Prometheus (Debian's package) scrapes a real server under a short load, and
every expression of the Grafana dashboard returns data; the histograms resolve LeNet.

Prometheus and promtool come from `apt-get install prometheus`; without them those tests
skip and say so. Prometheus listens on loopback only and is stopped with the test."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from service.observability.metrics import LATENCY_BUCKETS
from tests.deploy.test_dashboard import GPU_METRICS, dashboard, expressions
from tests.servers import ServerProcess, free_port, start_server
from tests.service.oip import wait_until

SCRAPE_S = 1
LOAD_S = 6.0
WINDOW = "10s"
"""What $__rate_interval stands for here: several scrapes of the load."""
NEEDS_PROMETHEUS = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed (apt-get install prometheus)")


def load(server: ServerProcess, seconds: float) -> None:
    """Well-formed calls from 3 REST clients and a gRPC one, and some that fail. Few
    clients: on 2 cores more contend with onnxruntime and spread its times."""
    x = np.random.default_rng(3).standard_normal((1, 1, 28, 28)).astype(np.float32)
    end = time.monotonic() + seconds

    def rest() -> None:
        client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        tensor = triton_http.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        wrong = triton_http.InferInput("input", [1, 1, 28, 27], "FP32")
        wrong.set_data_from_numpy(x[..., :27].copy())
        calls = 0
        while time.monotonic() < end:
            calls += 1
            with contextlib.suppress(InferenceServerException):  # every 50th call fails
                client.infer("lenet", [wrong] if calls % 50 == 0 else [tensor])

    def grpc() -> None:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.port}")
        tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        while time.monotonic() < end:
            client.infer("lenet", [tensor])

    threads = [threading.Thread(target=f) for f in [rest] * 3 + [grpc]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.fixture(scope="module")
def loaded(served_repo: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[ServerProcess, str | None]]:
    """A server that has run the load, and the address of a Prometheus that scraped it
    throughout (None where Prometheus is absent)."""
    # Triton's delay rule: under a steady load, batches of a steady size, so a batch's
    # median and mean compute time agree and their comparison measures the histogram's
    # resolution (batches of 1 to 8 images make a two-humped spread).
    server = start_server(served_repo, "--batching", "delay")
    prometheus, address = None, None
    try:
        if shutil.which("prometheus"):
            folder = tmp_path_factory.mktemp("prometheus")
            (folder / "prometheus.yml").write_text(json.dumps({
                "global": {"scrape_interval": f"{SCRAPE_S}s"},
                "scrape_configs": [{"job_name": "cnnserve", "static_configs": [
                    {"targets": [f"127.0.0.1:{server.metrics_port}"]}]}]}))
            address = f"127.0.0.1:{free_port()}"
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={address}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(lambda: _up(address), timeout=60)
        load(server, LOAD_S)
        if address is not None:  # until a scrape has seen the whole load
            total = sum(float(v) for v in re.findall(
                r'^cnnserve_requests_total\{[^}]*api="(?:http|oip)"[^}]*\} (\S+)$',
                server.metrics(), re.M))
            wait_until(lambda: _scraped_calls(address) >= total, timeout=30)
        yield server, address
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        server.terminate()


def _get(address: str, path: str, **params: str) -> Any:
    url = f"http://{address}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def _up(address: str) -> bool:
    try:
        result = _get(address, "/api/v1/query", query='up{job="cnnserve"}')["data"]["result"]
    except OSError:
        return False
    return bool(result) and result[0]["value"][1] == "1"


def _scraped_calls(address: str) -> float:
    query = 'sum(cnnserve_requests_total{api=~"http|oip"})'
    result = _get(address, "/api/v1/query", query=query)["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def _grafana(expr: str) -> str:
    """The expression as Grafana sends it with every variable at All."""
    for name in ("model", "version", "instance", "gpu"):
        expr = expr.replace(f"${name}", ".*")
    return expr.replace("$__rate_interval", WINDOW)


@NEEDS_PROMETHEUS
def test_every_dashboard_expression_returns_data_from_a_real_prometheus(
        loaded: tuple[ServerProcess, str | None]) -> None:
    _, address = loaded
    assert address is not None
    for expr in expressions(dashboard()):
        answer = _get(address, "/api/v1/query", query=_grafana(expr))
        assert answer["status"] == "success", (expr, answer)
        if set(re.findall(r"cnnserve_\w+", expr)) <= GPU_METRICS:
            continue  # valid, and empty: no GPU here
        values = [float(r["value"][1]) for r in answer["data"]["result"]]
        assert values and any(v == v for v in values), f"no data for {expr}"  # v == v: not NaN


@NEEDS_PROMETHEUS
def test_every_dashboard_variable_has_values(loaded: tuple[ServerProcess, str | None]) -> None:
    _, address = loaded
    assert address is not None
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query" or variable["name"] == "gpu":
            continue
        metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)",
                                     variable["query"]["query"]).groups()  # type: ignore[union-attr]
        values = _get(address, f"/api/v1/label/{label}/values",
                      **{"match[]": _grafana(metric)})["data"]
        assert values, variable["name"]


@NEEDS_PROMETHEUS
def test_promtool_finds_nothing_to_lint_and_no_created_series(
        loaded: tuple[ServerProcess, str | None]) -> None:
    server, _ = loaded
    text = server.metrics()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
        check.stdout + check.stderr
    assert "_created" not in text
    (labels,) = re.findall(r"^cnnserve_build_info\{(.*)\} 1.0$", text, re.M)
    build = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    assert set(build) == {"version", "onnxruntime", "python"} and "unknown" not in build.values()


def _buckets(text: str, name: str, model: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a histogram's buckets for `model`."""
    found: dict[float, float] = {}
    for labels, value in re.findall(rf"^{name}_bucket\{{([^}}]*)\}} (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if got["model"] == model:
            found[float(got["le"])] = found.get(float(got["le"]), 0.0) + float(value)
    return sorted(found.items())


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """As PromQL's histogram_quantile: linear within the bucket holding the rank."""
    total = buckets[-1][1]
    rank, lower, below = q * total, 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = upper, cumulative
    raise AssertionError("rank past the last bucket")


def test_the_compute_histogram_resolves_lenet(loaded: tuple[ServerProcess, str | None]) -> None:
    server, _ = loaded
    text = server.metrics()
    buckets = _buckets(text, "cnnserve_compute_seconds", "lenet")
    assert [b for b, _ in buckets][:-1] == list(LATENCY_BUCKETS)
    counts = np.diff([0.0] + [c for _, c in buckets])
    # Fine steps where LeNet's batches run: the bucket holding the median spans at most a
    # third of its upper edge (Prometheus' default buckets would put them all in 0-5 ms).
    # Steady batches may all fall in that one bucket (98% in 150-200 us in one run); the
    # median read from the buckets, against the mean below, measures the rest.
    median_at = next(i for i, (_, c) in enumerate(buckets) if c >= buckets[-1][1] / 2)
    upper = buckets[median_at][0]
    lower = buckets[median_at - 1][0] if median_at else 0.0
    assert upper - lower <= upper / 3, (lower, upper, counts)
    stats = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}"
                                              ).get_inference_statistics("lenet")
    batches = stats["model_stats"][0]["batch_stats"]
    executions = sum(b["compute_infer"]["count"] for b in batches)
    mean = sum(b["compute_input"]["ns"] + b["compute_infer"]["ns"] for b in batches) \
        / executions / 1e9
    p50 = _quantile(0.5, buckets)
    assert abs(p50 - mean) <= 0.25 * mean, (p50, mean, counts)
