"""Triton's perf_analyzer against the server, when `make perf-analyzer` installed it.

perf_analyzer reads ModelConfig, drives ModelInfer (plain, through system shared memory,
or over ModelStreamInfer) and checks ModelStatistics (it aborts when the server's compute
counts disagree), so this is the protocol seen by Triton's own tool. It needs Debian's
libb64-0d, which a plain `make test` does not install.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.servers import ROOT, ServerProcess

PERF_ANALYZER = ROOT / "loadtests" / "perf_analyzer.sh"
INSTALLED = (ROOT / ".venv-perf-analyzer" / "bin" / "perf_analyzer").exists()


@pytest.mark.skipif(not INSTALLED, reason="perf_analyzer not installed: make perf-analyzer")
@pytest.mark.parametrize("mode", [[], ["--shared-memory", "system"], ["--streaming"]],
                         ids=["grpc", "system-shared-memory", "streaming"])
def test_perf_analyzer_measures_the_server_and_its_statistics(
        server: ServerProcess, mode: list[str]) -> None:
    run = subprocess.run(
        [str(PERF_ANALYZER), "-m", "lenet", "-u", server.address, "-i", "grpc",
         "--concurrency-range", "2", "--measurement-mode", "count_windows",
         "--measurement-request-count", "100", "--max-trials", "5",
         "--stability-percentage", "100", *mode],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", run.stdout)
    assert throughput and float(throughput[1]) > 0, run.stdout
    server_side = run.stdout.split("Server:", 1)[1]
    assert re.search(r"Inference count: [1-9]", server_side), run.stdout
    assert "compute infer" in server_side, run.stdout
    assert "Unable to" not in run.stdout + run.stderr, run.stdout + run.stderr
