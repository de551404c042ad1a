"""The abuse suite's attacks, small and fast, each against a fresh real server.

Run as `python -m loadtests.abuse` in a process of its own: its protocol stubs and
tritonclient's (which other tests load) cannot share one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import ROOT

# Smaller limits than the defaults, so that a short attack reaches them.
CASES: dict[str, tuple[dict[str, str], set[str]]] = {
    # The flood's calls end evicted by the well-behaved clients' fair share (or, if none
    # comes, at the arrival timeout).
    "headers-only": ({"CNNSERVE_REQUEST_ARRIVAL_TIMEOUT_S": "1",
                      "CNNSERVE_MAX_CONCURRENT_RPCS": "100"}, {"oip RESOURCE_EXHAUSTED"}),
    "health-watch": ({"CNNSERVE_MAX_OPEN_STREAMS": "8"}, {"health_watch RESOURCE_EXHAUSTED"}),
    "unread-answers": ({"CNNSERVE_MAX_BYTES_PER_CONNECTION": str(1 << 20)}, {"oip OK"}),
    "stream-burst": ({}, {"oip OK"}),
    "decode-cpu": ({}, {"classifier INVALID_ARGUMENT"}),
    "gzip-expansion": ({}, {"oip CANCELLED"}),
    "big-images": ({}, {"classifier INVALID_ARGUMENT"}),
    "protocol-errors": ({}, {"oip INVALID_ARGUMENT", "oip NOT_FOUND",
                             "classifier INVALID_ARGUMENT"}),
    "metrics-port": ({}, set()),
    "rest-bodies": ({}, {"http INVALID_ARGUMENT", "http RESOURCE_EXHAUSTED",
                         "http UNIMPLEMENTED"}),
    "rest-slow": ({"CNNSERVE_REQUEST_ARRIVAL_TIMEOUT_S": "1"}, {"http DEADLINE_EXCEEDED"}),
}


@pytest.mark.parametrize("attack", list(CASES))
def test_the_server_withstands(attack: str, served_repo: Path, tmp_path: Path) -> None:
    env, expected_counts = CASES[attack]
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, "-m", "loadtests.abuse", "--repo", str(served_repo),
                          "--scale", "quick", "--attack", attack, "--json", str(out)],
                         cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.exists(), run.stdout + run.stderr
    result = json.loads(out.read_text())[0]
    assert not result["probe_failures"], result
    assert result["probe_max_ms"] < 1000, result  # the 100 ms goal is the full suite's
    assert set(result["good"]) <= {"OK", "RESOURCE_EXHAUSTED"}, result
    assert result["good"].get("OK", 0) > 0, result
    assert set(result["good_rest"]) <= {"OK", "RESOURCE_EXHAUSTED"}, result
    assert result["good_rest"].get("OK", 0) > 0, result
    assert result["afterwards_ok"], result
    assert result["sigterm_code"] == 0 and result["sigterm_s"] <= 11, result
    assert not any("bad error text" in k for k in result["attacker"]), result
    assert expected_counts <= set(result["counted"]), result
    if attack == "headers-only":  # fair share: its calls take the slots of the flood's
        assert "RESOURCE_EXHAUSTED" not in result["good"], result
    if attack == "stream-burst":  # gRPC core sheds a backlog of calls with CANCELLED
        assert "CANCELLED" not in result["attacker"], result
    if attack == "rest-bodies":  # the 10 GB declaration is refused before it is read
        assert {"HTTP 400", "HTTP 413", "HTTP 501"} <= set(result["attacker"]), result
    if attack == "rest-slow":  # trickled headers and bodies are cut off
        assert result["attacker"].get("headers: closed by the server", 0) > 0, result
        assert result["attacker"].get("body: answered 504", 0) > 0, result
    if attack == "metrics-port":
        assert {k for k in result["attacker"] if "404" in k} == {
            "/: 404", "/v2/health/ready: 404", "/metrics/../x: 404"}, result
