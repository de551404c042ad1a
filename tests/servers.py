"""Start real server processes on loopback ports for tests."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            return r.read().decode()

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_server(repo: Path, *args: str, env: dict[str, str] | None = None, port: int = 0,
                 processes: int = 1) -> ServerProcess:
    """Start `python -m service` and wait (bounded) for each process's ready line."""
    metrics_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--repo", str(repo), "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", str(metrics_port), "--device", "cpu",
         "--intra-op-threads", "1", *args],  # later flags win: args override these
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})})
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    ready = 0
    while True:
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            proc.kill()
            log = "".join(output)
            raise RuntimeError(f"server not ready in {START_TIMEOUT_S}s:\n{log}") from None
        if line is None:
            raise RuntimeError(f"server exited with {proc.wait()}:\n{''.join(output)}")
        if line.startswith("cnnserve ready on "):
            ready += 1
            if ready == processes:
                return ServerProcess(proc, int(line.rsplit(":", 1)[1]), metrics_port, output)
