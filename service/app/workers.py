"""`--workers N`: N server processes on one port (SO_REUSEPORT), metrics summed.

One Python process tops out at a few thousand calls per second (the GIL); several
processes, each with its own sessions and batchers, use a many-core GPU host. The
kernel spreads connections across them. This parent only supervises: it forwards
SIGTERM/SIGINT, serves the merged Prometheus metrics, and exits when they have. A worker
whose parent dies some other way (SIGKILL, the OOM killer) gets SIGTERM from the kernel
and shuts down gracefully: none goes on holding the port alone.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from service.app.settings import ServiceSettings

log = logging.getLogger(__name__)
SUPERVISOR_ENV = "CNNSERVE_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def supervise(settings: ServiceSettings) -> int:
    if settings.device not in ("auto", "cpu"):  # one line here, not one per worker
        from service.engine.runtime import DeviceError, place

        try:
            place(settings.device)
        except DeviceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="cnnserve-metrics-") as metrics_dir:
        # prometheus_client picks its multiprocess value store when first imported, so
        # the variable must be set before this process or a worker imports it.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        from prometheus_client import CollectorRegistry, multiprocess

        from service.observability.gpu_metrics import register_gpu_metrics
        from service.observability.metrics_http import MetricsServer

        child = settings.model_copy(update={"workers": 1, "metrics_port": None})
        settings_file = Path(metrics_dir) / "settings.json"  # in a 0700 folder
        fields = child.model_dump(mode="json")
        if child.auth_token is not None:  # model_dump masks secrets; the workers need it
            fields["auth_token"] = child.auth_token.get_secret_value()
        settings_file.write_text(json.dumps(fields))
        settings_file.chmod(0o600)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        register_gpu_metrics(registry)  # once, in the process that serves the scrape
        with MetricsServer.serving(registry, settings.host, settings.metrics_port):
            return _run_workers(settings, settings_file)


def _run_workers(settings: ServiceSettings, settings_file: Path) -> int:
    from prometheus_client import multiprocess

    procs: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    # Before the workers start, so a signal that comes early still reaches them.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(settings.workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "service", "--settings-json",
                                       str(settings_file), "--worker-index", str(index)],
                                      env={**os.environ, SUPERVISOR_ENV: str(os.getpid())}))
    log.info("started %d workers: pids %s", len(procs), [p.pid for p in procs])
    codes = []
    for proc in procs:
        codes.append(proc.wait())
        multiprocess.mark_process_dead(proc.pid)
    log.info("workers exited with %s", codes)
    return 0 if all(code == 0 for code in codes) else 1


def follow_supervisor() -> None:
    """In a worker (Linux): SIGTERM when the supervisor that started it dies, or at once
    if it died before this ran."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("could not ask for SIGTERM when the supervisor dies (errno %d)",
                    ctypes.get_errno())
    if os.getppid() != int(supervisor):
        os.kill(os.getpid(), signal.SIGTERM)
