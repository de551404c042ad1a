"""The ready line a launcher waits for, when another writer shares the server's pipe."""

from __future__ import annotations

import sys

from loadtests.launch import launch

MID_LINE = """
import os, sys, time
from service.app.ready import announce, ready_line
os.write(1, b"I1207 02:00:01.000000 42 model_lifecycle.cc:839] ")  # a child's log, mid-line
announce(ready_line("fake", "127.0.0.1", 4321))
os.write(1, b'"successfully loaded"\\n')
time.sleep(60)
"""


def test_a_ready_line_announced_while_another_writer_is_mid_line_is_still_found() -> None:
    """Triton's log lines share pytriton's stdout pipe: the ready line is written whole,
    on a line of its own, so the launcher finds it (a print() after the half line gave
    the launcher nothing to match, and the peers run gave up after 180 s)."""
    program = launch([sys.executable, "-c", MID_LINE], timeout=20)
    try:
        assert program.port == 4321
        assert "fake ready on 127.0.0.1:4321\n" in program.lines
    finally:
        program.stop(timeout=5)
