"""Start real server processes on loopback ports for tests."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from loadtests.launch import ROOT, Launched, free_port, free_ports, launch

__all__ = ["ROOT", "ServerProcess", "free_port", "start_server"]
START_TIMEOUT_S = 120


@dataclass
class ServerProcess(Launched):
    metrics_port: int
    probe_port: int
    http_port: int

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            return r.read().decode()


def start_server(repo: Path, *args: str, env: dict[str, str] | None = None, port: int = 0,
                 processes: int = 1) -> ServerProcess:
    """Start `python -m service` and wait (bounded) for each process's ready line. Its
    ports are picked together (the gRPC port too, unless given), so that none is the port
    another of them took: a gRPC port 0 could land on one picked for REST."""
    picked, metrics_port, probe_port, http_port = free_ports(4)
    port = port or picked
    started = launch(
        [sys.executable, "-m", "service", "--repo", str(repo), "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", str(metrics_port),
         "--probe-port", str(probe_port), "--http-port", str(http_port), "--device", "cpu",
         "--intra-op-threads", "1", *args],  # later flags win: args override these
        processes=processes, timeout=START_TIMEOUT_S, env=env)
    return ServerProcess(started.proc, started.port, started.lines, metrics_port, probe_port,
                         http_port)
