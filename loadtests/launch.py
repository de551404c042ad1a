"""Start a server program on loopback and wait for its ready line.

One launcher for the tests, the benchmark and the soak run: it keeps everything the
program prints (so a failure shows the log), and never waits without a bound.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.app.ready import READY

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: each socket stays bound until all are picked (one at a
    time, the kernel may hand the same port out twice)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


@dataclass
class Launched:
    proc: subprocess.Popen[str]
    port: int
    lines: list[str]
    """Everything the program printed (stdout and stderr), as it arrives."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (a graceful shutdown), then its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, and SIGKILL if it has not exited in `timeout` seconds."""
        try:
            self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def launch(cmd: Sequence[str], processes: int = 1, timeout: float = START_TIMEOUT_S,
           env: dict[str, str] | None = None) -> Launched:
    """Run `cmd` from the project root until `processes` ready lines appear."""
    proc = subprocess.Popen(list(cmd), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    arrived: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:  # drains the pipe for the program's whole life, so it never blocks
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            arrived.put(line)
        arrived.put(None)

    threading.Thread(target=pump, daemon=True).start()
    ready = 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = arrived.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            proc.kill()
            raise RuntimeError(f"{cmd[-1]}: not ready in {timeout:g}s:\n{''.join(output)}"
                               ) from None
        if line is None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.wait()}:\n{''.join(output)}")
        if (match := READY.match(line.rstrip("\n"))) is not None:
            ready += 1
            if ready == processes:
                return Launched(proc, int(match["port"]), output)


@contextmanager
def launched(cmd: Sequence[str], processes: int = 1, timeout: float = START_TIMEOUT_S,
             env: dict[str, str] | None = None) -> Iterator[Launched]:
    """`launch`, stopped when the block ends."""
    program = launch(cmd, processes, timeout, env)
    try:
        yield program
    finally:
        program.stop()
