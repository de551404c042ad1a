"""`--workers N`: what becomes of the workers when their supervisor dies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil

from tests.servers import ServerProcess, free_port


def test_workers_shut_down_when_their_supervisor_is_killed(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """SIGKILL (or the OOM killer) gives the supervisor no chance to forward anything:
    the kernel tells each worker, which drains and exits instead of serving on alone."""
    server = server_factory(served_repo, "--workers", "2", port=free_port(), processes=2)
    workers = psutil.Process(server.proc.pid).children()
    assert len(workers) == 2
    server.proc.kill()
    server.proc.wait(10)
    _, alive = psutil.wait_procs(workers, timeout=30)
    for orphan in alive:  # not left behind by a failing run
        orphan.kill()
    assert not alive, f"workers outlived their supervisor: {[p.pid for p in alive]}"
