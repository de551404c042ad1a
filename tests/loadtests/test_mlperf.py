"""The LoadGen harness: MLPerf's own load generator against a real server on loopback, its
summary read back, the server's statistics beside it, and the peak search's rules."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loadtests.mlperf import Run, peak, summary
from tests.servers import ROOT, ServerProcess


def mlperf(server: ServerProcess, repo: Path, tmp_path: Path, *args: str) -> dict[str, Any]:
    """`python -m loadtests.mlperf` against `server` for LeNet, in a process of its own
    (its protocol stubs and tritonclient's cannot share one): its runs, from --json."""
    out = tmp_path / "runs.json"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.mlperf", server.address, "--repo", str(repo),
         "--models", "lenet", "--min-seconds", "1", "--server-pid", str(server.proc.pid),
         "--json", str(out), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    found: dict[str, Any] = json.loads(out.read_text())["lenet"]
    return found


def test_a_low_poisson_rate_is_valid_and_its_batches_and_cpu_are_measured(
        server: ServerProcess, served_repo: Path, tmp_path: Path) -> None:
    result = mlperf(server, served_repo, tmp_path, "--scenarios", "Server", "--qps", "50",
                    "--bound-ms", "2000", "--min-queries", "200")["Server"]
    assert result["valid"] and result["errors"] == 0
    assert result["queries"] >= 200
    assert result["qps"] == pytest.approx(50, rel=0.3)  # LoadGen's own schedule
    assert 0 < result["p50_ms"] <= result["p99_ms"] < 2000
    assert 1.0 <= result["mean_batch"] < 4  # 50 a second rarely meet
    assert result["server_cpu_us"] > 0


def test_a_bound_no_server_can_meet_is_invalid(server: ServerProcess, served_repo: Path,
                                              tmp_path: Path) -> None:
    result = mlperf(server, served_repo, tmp_path, "--scenarios", "Server", "--qps", "50",
                    "--bound-ms", "0.001", "--min-queries", "100")["Server"]
    assert not result["valid"] and result["errors"] == 0


def test_single_stream_and_offline_report_latency_and_throughput(
        server: ServerProcess, served_repo: Path, tmp_path: Path) -> None:
    found = mlperf(server, served_repo, tmp_path, "--scenarios", "SingleStream", "Offline",
                   "--min-queries", "200")
    single, offline = found["SingleStream"], found["Offline"]
    assert single["valid"] and single["errors"] == 0 and single["queries"] >= 200
    assert 0 < single["p50_ms"] <= single["p90_ms"]
    assert offline["valid"] and offline["errors"] == 0
    assert offline["qps"] > 0 and offline["mean_batch"] > 1  # 64 in flight batch together


def test_a_refused_query_makes_a_run_invalid(
        served_repo: Path, tmp_path: Path, server_factory: Callable[..., ServerProcess]
        ) -> None:
    """Queries the server refuses complete at once: counted as errors, never as fast."""
    server = server_factory(served_repo, "--max-queue-size", "1", "--batching", "delay",
                            "--max-queue-delay-us", "200000")
    result = mlperf(server, served_repo, tmp_path, "--scenarios", "Server", "--qps", "200",
                    "--bound-ms", "5000", "--min-queries", "100")["Server"]
    assert result["errors"] > 0 and result["error_codes"].get("RESOURCE_EXHAUSTED", 0) > 0
    assert not result["valid"]


def _run(qps: float, valid: bool) -> Run:
    nan = math.nan
    return Run("Server", qps, valid, 2000, 0, {}, qps, nan, nan, nan, False, nan, nan)


def test_the_peak_is_bisected_then_confirmed_stepping_down_while_confirmation_fails() -> None:
    capacity = 700.0
    tried: list[float] = []

    def trial(qps: float) -> Run:
        tried.append(qps)
        return _run(qps, qps <= capacity)

    found, runs = peak(trial, 1000.0, steps=8, say=lambda _: None)
    assert tried[0] == 500.0 and len(runs) == len(tried)
    assert 0.97 * capacity <= found <= capacity
    assert tried[-1] == found  # the confirmation

    flaky = iter([True, True, False, True])  # 750 held, then failed its confirmation
    found, runs = peak(lambda q: _run(q, next(flaky)), 1000.0, steps=2, say=lambda _: None)
    assert found == pytest.approx(750 * 0.9)
    assert [r.target_qps for r in runs] == pytest.approx([500, 750, 750, 675])

    assert peak(lambda q: _run(q, False), 1000.0, steps=3, say=lambda _: None)[0] == 0.0


def test_the_summary_is_read_by_key() -> None:
    text = ("Scenario : Server\nScheduled samples per second : 299.83\n"
            "Result is : INVALID\n  Performance constraints satisfied : Yes\n"
            "99.00 percentile latency (ns)   : 7750000\n")
    found = summary(text)
    assert found["Performance constraints satisfied"] == "Yes"
    assert found["Scheduled samples per second"] == "299.83"
    assert found["99.00 percentile latency (ns)"] == "7750000"
