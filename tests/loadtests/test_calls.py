"""The call-count benchmark against real servers (a few requests: counts, not times)."""

from __future__ import annotations

from pathlib import Path

from loadtests.calls import report, run


def test_counts_the_python_calls_each_request_costs_in_the_service_and_the_echo_server(
        served_repo: Path) -> None:
    rows, stats = run(served_repo, requests=20, warmup=5)
    assert [call for call, _, _ in rows] == ["unary", "stream", "rest", "classify"]
    for call, ours, echo in rows:
        assert ours.calls_per_request > 10, call
        if echo is not None:  # the echo server does nothing but answer
            assert 0 < echo.calls_per_request < ours.calls_per_request, call
    text = report(rows, stats, 20)
    assert "| unary |" in text and "| classify |" in text
