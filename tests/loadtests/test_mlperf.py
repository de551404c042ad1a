"""The LoadGen harness: MLPerf's own load generator against a real server on loopback, its
summary read back, the server's statistics beside it, and the peak search's rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadtests.mlperf import Run, Target, main, peak, run, summary
from loadtests.perf import real_inputs
from tests.servers import ServerProcess


def _target(server: ServerProcess, repo: Path) -> Target:
    return Target(server.address, "lenet", real_inputs(repo, "lenet"),
                  server_pid=server.proc.pid)


def test_a_low_poisson_rate_is_valid_and_its_batches_and_cpu_are_measured(
        server: ServerProcess, served_repo: Path) -> None:
    result = run(_target(server, served_repo), "Server", qps=50, bound_ms=2000,
                 min_queries=200, min_seconds=1)
    assert result.valid and result.errors == 0
    assert result.queries >= 200
    assert result.qps == pytest.approx(50, rel=0.3)  # LoadGen's own schedule
    assert 0 < result.p50_ms <= result.p99_ms < 2000
    assert 1.0 <= result.mean_batch < 4  # 50 a second rarely meet
    assert result.server_cpu_us > 0


def test_a_bound_no_server_can_meet_is_invalid(server: ServerProcess,
                                              served_repo: Path) -> None:
    result = run(_target(server, served_repo), "Server", qps=50, bound_ms=0.001,
                 min_queries=100, min_seconds=1)
    assert not result.valid and result.errors == 0


def test_single_stream_and_offline_report_latency_and_throughput(
        server: ServerProcess, served_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    assert main([server.address, "--repo", str(served_repo), "--models", "lenet",
                 "--scenarios", "SingleStream", "Offline", "--min-queries", "200",
                 "--min-seconds", "1", "--server-pid", str(server.proc.pid),
                 "--json", str(out)]) == 0
    found = json.loads(out.read_text())["lenet"]
    single, offline = found["SingleStream"], found["Offline"]
    assert single["valid"] and single["errors"] == 0 and single["queries"] >= 200
    assert 0 < single["p50_ms"] <= single["p90_ms"]
    assert offline["valid"] and offline["errors"] == 0
    assert offline["qps"] > 0 and offline["mean_batch"] > 1  # 64 in flight batch together


def test_a_refused_query_makes_a_run_invalid(served_repo: Path,
                                             server_factory: object) -> None:
    """Queries the server refuses complete at once: counted as errors, never as fast."""
    from collections.abc import Callable

    factory: Callable[..., ServerProcess] = server_factory  # type: ignore[assignment]
    server = factory(served_repo, "--max-queue-size", "1", "--batching", "delay",
                     "--max-queue-delay-us", "200000")
    result = run(_target(server, served_repo), "Server", qps=200, bound_ms=5000,
                 min_queries=100, min_seconds=1)
    assert result.errors > 0 and result.error_codes.get("RESOURCE_EXHAUSTED", 0) > 0
    assert not result.valid


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
