"""The measuring tool of the benchmark and the peers: its client against real servers, its
CPU accounting against a real process tree, and the benchmark's ratios."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtests.bench import Scenario, in_process, plan, ratios
from loadtests.launch import launched
from loadtests.peers import Row, table
from loadtests.perf import (
    Load,
    Measured,
    perf_analyzer,
    perf_analyzer_installed,
    real_inputs,
    tree_cpu_s,
)
from loadtests.report import LocustStats, Reference, ScenarioResult, batch_label, results_table
from service.app.cli import parse_settings
from tests.servers import ROOT, ServerProcess


def test_real_inputs_are_test_digits_preprocessed_for_the_model(served_repo: Path) -> None:
    inputs = real_inputs(served_repo, "alexnet")
    assert inputs.name == "input"
    assert inputs.images.dtype == np.float32 and inputs.images.ndim == 4
    assert np.isfinite(inputs.images).all() and inputs.images.std() > 0.1  # digits, not zeros
    assert len(np.unique(inputs.images.reshape(len(inputs.images), -1), axis=0)) > 100


def measure(*args: str) -> dict[str, float]:
    """`python -m loadtests.perf`: in a process of its own, since the client builds its
    requests with the service's protobuf stubs, which clash with tritonclient's here."""
    run = subprocess.run([sys.executable, "-m", "loadtests.perf", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result: dict[str, float] = json.loads(run.stdout)
    return result


def test_the_in_process_reference_runs_the_served_model(served_repo: Path) -> None:
    settings, _ = parse_settings(["--device", "cpu"])
    reference = in_process(served_repo, "lenet", 4, settings, seconds=0.2, rounds=2)
    assert (reference.model, reference.batch_size) == ("lenet", 4)
    assert reference.images_per_s > 100


@pytest.mark.parametrize("streams", [(), ("--streaming",)], ids=["unary", "streams"])
def test_closed_loop_client_measures_the_service(server: ServerProcess, served_repo: Path,
                                                 streams: tuple[str, ...]) -> None:
    result = measure(server.address, "--repo", str(served_repo), "--concurrency", "2",
                     "--images-per-request", "3", "--seconds", "1",
                     "--server-pid", str(server.proc.pid), *streams)
    assert result["errors"] == 0 and result["requests"] > 10
    assert result["images_per_s"] == pytest.approx(3 * result["requests_per_s"])
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert 0 < result["server_cpu_us"] < 1e6
    assert 0 < result["client_cpu_us"] < 1e6


@pytest.mark.parametrize("streams", [(), ("--streaming",)], ids=["unary", "streams"])
def test_closed_loop_client_counts_refusals_as_errors(server: ServerProcess, served_repo: Path,
                                                      streams: tuple[str, ...]) -> None:
    """Refused calls, and on a stream the answers that carry an error, are errors."""
    result = measure(server.address, "--repo", str(served_repo), "--model", "lenet",
                     "--seconds", "0.3", "--concurrency", "1", "--images-per-request", "64",
                     *streams)
    assert result["requests"] == 0 and result["errors"] > 0  # over max_batch_size


def test_tree_cpu_counts_the_children_of_a_server() -> None:
    # The grandchild spins 0.4 s of CPU, says so, and stays alive until stdin closes.
    child = ("import sys, time\nend = time.process_time() + 0.4\n"
             "while time.process_time() < end: pass\nprint('spun', flush=True)\n"
             "sys.stdin.read()")
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys\n"
                               f"subprocess.run([sys.executable, '-c', {child!r}])"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "spun\n"
        assert tree_cpu_s(parent.pid) >= 0.35
    finally:
        parent.communicate("", timeout=30)


@pytest.mark.skipif(not perf_analyzer_installed(),
                    reason="perf_analyzer not installed: make perf-analyzer")
def test_perf_analyzer_drives_the_echo_server_and_the_service(
        server: ServerProcess, served_repo: Path, tmp_path: Path) -> None:
    inputs = real_inputs(served_repo, "lenet")
    with launched([sys.executable, "-m", "loadtests.echo"]) as echo:
        for address, version in ((echo.address, "1"), (server.address, "1")):
            for streaming in (False, True):
                result = perf_analyzer(address, inputs, Load("lenet", 2, 4, 1.5, version,
                                                             streaming=streaming), tmp_path)
                assert result.requests_per_s > 0 and result.p50_ms > 0, (address, streaming)
                assert result.images_per_s == pytest.approx(4 * result.requests_per_s)
                assert 0 < result.client_cpu_us < 1e6, "perf_analyzer's CPU was not counted"
    streamed = re.search(r'^cnnserve_requests_total\{api="oip_stream",code="OK",model="lenet"\} '
                         r'(\S+)$', server.metrics(), re.M)
    assert streamed and float(streamed[1]) > 10, "perf_analyzer did not stream"


def test_the_cpu_bound_ceiling_is_the_hosts_cores_over_both_sides_cpu_per_request() -> None:
    measured = _result("transport", "lenet", 32, rps=2000).model_copy(update={
        "server_cpu_us": 600.0, "client_cpu_us": 200.0, "host_cores": 2})
    assert measured.cpu_bound_rps == pytest.approx(2500)
    assert re.search(r"\b600\s+200\s+0\.80\b", results_table([measured]))
    assert _result("transport", "lenet", 32, rps=2000).cpu_bound_rps is None  # Locust: unknown


def _result(scenario: str, model: str, users: int, rps: float, p50: float = 1.0,
            images: int = 1, batching: bool = True, api: str = "oip") -> ScenarioResult:
    return ScenarioResult(scenario=scenario, model=model, api=api, users=users,
                          images_per_request=images, batching=batching,
                          stats=LocustStats(name="x", requests=100, failures=0, rps=rps,
                                            p50_ms=p50, p95_ms=p50, p99_ms=p50))


def test_ratios_hold_the_issue_targets() -> None:
    results = [
        _result("saturation", "alexnet", 4, 100.0, images=32),  # 3,200 img/s
        _result("batching", "alexnet", 32, 2_000.0),
        _result("batching", "alexnet", 32, 500.0, batching=False),
        _result("transport", "lenet", 32, 3_600.0),
        _result("transport", "echo", 32, 4_000.0, batching=False),
        _result("transport", "lenet", 1, 800.0, p50=1.2),
        _result("transport", "echo", 1, 1_500.0, p50=0.6, batching=False),
    ]
    refs = [Reference(model="alexnet", batch_size=32, images_per_s=4_000.0),
            Reference(model="lenet", batch_size=1, images_per_s=20_000.0)]
    found = {name: (value, target) for name, value, target in ratios(results, refs)}
    assert found["alexnet: 32-image requests, served / in-process img/s at batch 32"] == (
        pytest.approx(0.8), ">= 0.95")
    assert found["alexnet: single images from 32 clients, served / in-process img/s at "
                 "batch 32"] == (pytest.approx(0.5), ">= 0.6")
    assert found["alexnet: batching on / off img/s at 32 users"] == (pytest.approx(4.0),
                                                                     ">= 1.5")
    assert found["lenet: req/s / echo req/s (1 image, 32 clients)"] == (pytest.approx(0.9),
                                                                        ">= 0.9")
    # 0.6 ms echo + 0.05 ms in-process + 0.3 ms = 0.95 ms
    bound = "lenet: p50 at 1 client / (echo p50 + in-process batch 1 + 0.3 ms = 0.95 ms)"
    value, target = found[bound]
    assert math.isclose(value, 1.2 / 0.95) and target == "<= 1.0"


def test_streamed_scenarios_get_ratios_of_their_own() -> None:
    # Listed first, so a ratio that did not tell streams from calls would pick them.
    results = [
        _result("batching", "alexnet", 32, 3_000.0, api="oip-stream"),
        _result("transport", "lenet", 32, 6_000.0, api="oip-stream"),
        _result("transport", "echo", 32, 12_000.0, batching=False, api="oip-stream"),
        _result("batching", "alexnet", 32, 2_000.0),
        _result("batching", "alexnet", 32, 500.0, batching=False),
        _result("transport", "lenet", 32, 3_000.0),
        _result("transport", "echo", 32, 4_000.0, batching=False),
    ]
    refs = [Reference(model="alexnet", batch_size=32, images_per_s=4_000.0)]
    found = {name: (value, target) for name, value, target in ratios(results, refs)}
    assert found["alexnet: single images from 32 clients, served / in-process img/s at "
                 "batch 32"] == (pytest.approx(0.5), ">= 0.6")
    assert found["alexnet: single images from 32 streams, served / in-process img/s at "
                 "batch 32"] == (pytest.approx(0.75), "(no target; 0.6 for calls)")
    assert found["alexnet: batching on / off img/s at 32 users"][0] == pytest.approx(4.0)
    assert found["lenet: req/s / echo req/s (1 image, 32 clients)"][0] == pytest.approx(0.75)
    assert found["lenet: req/s / echo req/s (1 image, 32 streams)"][0] == pytest.approx(0.5)
    assert found["lenet: 32 streams / 32 clients' calls, req/s"][0] == pytest.approx(2.0)


def test_the_full_plan_measures_what_the_ratios_need() -> None:
    scenarios = plan(["lenet", "alexnet", "vgg11_bn"], quick=False)
    assert Scenario("transport", "lenet", "oip", 1, 1, True) in scenarios
    assert Scenario("transport", "echo", "oip", 1, 1, False, echo=True) in scenarios
    assert Scenario("saturation", "vgg11_bn", "oip", 4, 32, True) in scenarios
    assert not any(s.api == "oip-stream" for s in scenarios)  # Locust cannot stream
    streams = plan(["lenet", "alexnet", "vgg11_bn"], quick=False, streams=True)
    assert Scenario("transport", "echo", "oip-stream", 32, 1, False, echo=True) in streams
    assert Scenario("batching", "alexnet", "oip-stream", 32, 1, True) in streams
    assert (ROOT / "loadtests" / "perf_analyzer.sh").is_file()


@pytest.mark.skipif(not perf_analyzer_installed(),
                    reason="perf_analyzer not installed: make perf-analyzer")
def test_scaleout_measures_each_worker_count(served_repo: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "loadtests.scaleout", "--repo", str(served_repo), "--device",
         "cpu", "--workers", "1,2", "--precisions", "fp32", "--models", "lenet",
         "--concurrency", "4", "--batch-concurrency", "1", "--seconds", "1.5",
         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (report,) = tmp_path.glob("scaleout-*/scaleout.md")
    rows = [line.split() for line in report.read_text().splitlines()
            if line.startswith("fp32 ")]
    assert [(r[1], r[3]) for r in rows] == [("1", "1"), ("1", "32"), ("2", "1"), ("2", "32")]
    assert all(float(r[6].replace(",", "")) > 0 for r in rows)


def test_the_peers_table_sets_the_service_against_each_peer() -> None:
    def row(server: str, c: int, rps: float) -> Row:
        return Row(server, "lenet", c, 1, Measured("asyncio gRPC", 100, 0, rps, 1.5, 2.0, 3.0,
                                                   500.0), None)

    text = table([row("cnnserve", 1, 900.0), row("MLServer", 1, 300.0),
                  row("cnnserve", 32, 2000.0), row("MLServer", 32, 1000.0)],
                 ["cnnserve", "MLServer"], ["lenet"], [1, 32])
    lines = text.splitlines()
    assert lines[0].split() == ["model,", "clients", "cnnserve", "MLServer", "cnnserve", "/",
                                "MLServer"]
    assert lines[2].split() == ["lenet,", "1", "900", "(1.50", "ms)", "300", "(1.50", "ms)",
                                "3.00"]
    assert lines[3].split() == ["lenet,", "32", "2,000", "1,000", "2.00"]


def test_the_batch_size_plot_names_each_scenario_by_model() -> None:
    labels = [batch_label(_result("batching", m, 16, rps=100.0))
              for m in ("lenet", "alexnet", "vgg11_bn")]
    assert labels == ["lenet batching", "alexnet batching", "vgg11_bn batching"]
    assert batch_label(_result("lenet grpc x1", "lenet", 16, rps=100.0)) == "lenet grpc x1"
