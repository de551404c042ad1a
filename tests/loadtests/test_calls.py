"""The call-count benchmark against real servers (a few requests: counts, not times).

It runs as `python -m loadtests.calls` in a process of its own: its protocol stubs and
tritonclient's (which other tests load) cannot share one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.servers import ROOT


def test_counts_the_python_calls_each_request_costs_in_the_service_and_the_echo_server(
        served_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "calls.md"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.calls", "--repo", str(served_repo),
         "--requests", "20", "--warmup", "5", "--clients", "4", "--seconds", "0.5",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {cells[0]: cells[1:] for line in out.read_text().splitlines()
            if line.startswith("| ") and len(cells := [c.strip() for c in
                                                       line.strip("|").split("|")]) == 7}
    assert {"unary", "stream", "rest", "classify", "unary, 4 clients",
            "stream, 4 streams"} <= rows.keys(), rows
    for call in ("unary", "stream", "rest", "unary, 4 clients", "stream, 4 streams"):
        ours, echo = float(rows[call][0]), float(rows[call][1])
        assert 0 < echo < ours, (call, rows[call])  # the echo server does nothing but answer
    assert float(rows["classify"][0]) > 10 and rows["classify"][1] == "-"
