"""Locust against a real server, the benchmark end to end, and the report generator."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from loadtests.report import (
    LocustStats,
    Reference,
    ScenarioResult,
    read_locust_stats,
    results_table,
    write_report,
)
from tests.servers import ROOT, ServerProcess, free_port

LOCUSTFILE = str(ROOT / "loadtests" / "locustfile.py")
HTTP_LOCUSTFILE = str(ROOT / "loadtests" / "http_locustfile.py")


def locust(host: str, out: Path, *extra: str, seconds: int = 4,
           locustfile: str = LOCUSTFILE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "locust", "-f", locustfile, "--headless", "--host", host,
         "-u", "4", "-r", "4", "-t", f"{seconds}s", "--stop-timeout", "5", "--csv", str(out),
         "--only-summary", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_both_user_classes_succeed_against_a_real_server(server: ServerProcess,
                                                         tmp_path: Path) -> None:
    result = locust(server.address, tmp_path / "run", "--model", "alexnet",
                    "--images-per-request", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    for method in ("Predict alexnet x2", "ModelInfer alexnet x2"):
        stats = read_locust_stats(tmp_path / "run_stats.csv", method)
        assert stats.requests > 0 and stats.failures == 0, method


def test_the_rest_users_succeed_against_a_real_server(server: ServerProcess,
                                                       tmp_path: Path) -> None:
    result = locust(f"http://127.0.0.1:{server.http_port}", tmp_path / "rest", "--model",
                    "alexnet", "--images-per-request", "2", locustfile=HTTP_LOCUSTFILE)
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("REST infer binary alexnet x2", "REST infer json alexnet x2",
                "REST classify png alexnet x2"):
        stats = read_locust_stats(tmp_path / "rest_stats.csv", row)
        assert stats.requests > 0 and stats.failures == 0, row


def test_an_unreachable_host_shows_up_as_failures_not_a_hang(tmp_path: Path) -> None:
    result = locust(f"127.0.0.1:{free_port()}", tmp_path / "down", "InferenceUser",
                    "--grpc-timeout", "1", seconds=3)
    stats = read_locust_stats(tmp_path / "down_stats.csv", "ModelInfer lenet x1")
    assert stats.failures == stats.requests > 0
    assert "UNAVAILABLE" in (tmp_path / "down_failures.csv").read_text()
    assert result.returncode == 1  # Locust's exit code when any request failed


def test_unknown_model_failures_carry_the_status_code(server: ServerProcess,
                                                      tmp_path: Path) -> None:
    locust(server.address, tmp_path / "bad", "ClassifierUser", "--model", "resnet", seconds=2)
    stats = read_locust_stats(tmp_path / "bad_stats.csv", "Predict resnet x1")
    assert stats.failures == stats.requests > 0
    assert "NOT_FOUND: unknown model 'resnet'" in (tmp_path / "bad_failures.csv").read_text()


def test_step_shape_is_bounded() -> None:
    # In a subprocess: importing locust monkey-patches the process with gevent.
    code = ("from loadtests.step_shape import StepLoadShape\n"
            "shape = StepLoadShape()\n"
            "for second in range(0, 400, 10):\n"
            "    shape.get_run_time = lambda s=second: float(s)\n"
            "    tick = shape.tick()\n"
            "    print(tick[0] if tick else 'stop')\n")
    ticks = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=True, timeout=60).stdout.split()
    users = [int(t) for t in ticks if t != "stop"]
    assert users[0] == 8 and max(users) == 64 and users == sorted(users)
    assert ticks[-1] == "stop"  # it stops by itself


RECORDED = """Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,\
Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,\
90%,95%,98%,99%,99.9%,99.99%,100%
grpc,ModelInfer,1200,0,12,13.1,2.0,80.0,72.0,300.0,0.0,12,14,15,16,20,25,40,55,80,80,80
,Aggregated,1200,0,12,13.1,2.0,80.0,72.0,300.0,0.0,12,14,15,16,20,25,40,55,80,80,80
"""


def test_report_turns_recorded_stats_into_table_and_plots(tmp_path: Path) -> None:
    (tmp_path / "rec_stats.csv").write_text(RECORDED)
    stats = read_locust_stats(tmp_path / "rec_stats.csv", "ModelInfer")
    assert stats == LocustStats(name="ModelInfer", requests=1200, failures=0, rps=300.0,
                                p50_ms=12, p95_ms=25, p99_ms=55)
    slow = stats.model_copy(update={"rps": 100.0, "p95_ms": 90.0})
    results = [
        ScenarioResult(scenario="sweep", model="alexnet", api="oip", users=u, images_per_request=1,
                       batching=True, stats=stats.model_copy(update={"rps": 50.0 * u}),
                       batch_sizes={"1.0": 10, "8.0": 5, "32.0": 2})
        for u in (1, 8)]
    results += [ScenarioResult(scenario="batching", model="alexnet", api="oip", users=32,
                               images_per_request=1, batching=on, stats=stats if on else slow)
                for on in (True, False)]
    summary = write_report(tmp_path / "report", results,
                           [Reference(model="alexnet", batch_size=32, images_per_s=400.0)],
                           [("alexnet: batching on / off", 3.0, ">= 1.5")], ["note"])
    text = summary.read_text()
    assert "| " not in results_table(results)
    assert "CPU" not in results_table(results)  # Locust measured none: no empty columns
    assert re.search(r"batching\s+alexnet\s+oip\s+32\s+1\s+on\s+300\s+300\s+12\s+25\s+55\s+0",
                     text)
    assert re.search(r"alexnet: batching on / off\s+3\.00\s+>= 1\.5", text)
    for png in ("latency_vs_throughput.png", "batching_on_off.png", "batch_sizes.png"):
        assert (tmp_path / "report" / png).read_bytes().startswith(b"\x89PNG")
        assert f"![{png}]({png})" in text


def test_quick_benchmark_runs_end_to_end(served_repo: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--repo", str(served_repo), "--quick",
         "--seconds", "2", "--models", "lenet", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    summary = (run / "summary.md").read_text()
    assert "batching  lenet" in summary and "served / in-process" in summary
    assert (run / "batching-lenet-oip-u16-i1-on_stats.csv").is_file()
    assert (run / "batching-lenet-oip-u16-i1-on.html").is_file()
    assert (run / "batch_sizes.png").is_file()


def test_locust_sends_the_bearer_token_a_secured_server_requires(
        served_repo: Path, tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, env={"CNNSERVE_AUTH_TOKEN": "load-test-token"})
    locust(server.address, tmp_path / "with", "InferenceUser", "--grpc-token",
           "load-test-token", seconds=2)
    stats = read_locust_stats(tmp_path / "with_stats.csv", "ModelInfer lenet x1")
    assert stats.requests > 0 and stats.failures == 0
    locust(server.address, tmp_path / "without", "InferenceUser", seconds=2)
    stats = read_locust_stats(tmp_path / "without_stats.csv", "ModelInfer lenet x1")
    assert stats.failures == stats.requests > 0
    assert "UNAUTHENTICATED" in (tmp_path / "without_failures.csv").read_text()


def test_overload_run_reports_refusals_and_memory(served_repo: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.soak", "--repo", str(served_repo), "--overload",
         "--queue-size", "1", "--users", "32", "--minutes", "0.1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    summary = (run / "summary.md").read_text()
    refused = re.search(r"failed RESOURCE_EXHAUSTED\s+(\d+)", summary)
    assert refused and int(refused.group(1)) > 0, summary
    assert "failed UNAVAILABLE" not in summary
    assert re.search(r"RSS MiB peak \(VmHWM\)\s+\d+", summary)
    assert (run / "rss.csv").read_text().startswith("seconds,rss_mib\n")
