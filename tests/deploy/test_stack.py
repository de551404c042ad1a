"""`docker compose up` for real: the project's three images built from its Dockerfile and
the CPU stack the README documents run, driven from the host and stopped.

Needs a container engine: one is started where none runs (root and apt-get); otherwise
the module skips and says why. One small model (LeNet, quick preset) keeps it lean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from contract.datasets import load_dataset
from loadtests.perf import real_inputs
from tests.deploy.engine import (
    compose_plugin,
    engine,
    scratch,
    standin_base,
    standin_prometheus,
    torch_index,
)
from tests.servers import ROOT
from tests.service.oip import metric, wait_until

PROJECT = "cnnserve-suite"
FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"]
# The stand-in's own additions: builds on the host network (the torch index is on loopback).
BUILD_ON_HOST = """services:
  trainer: {build: {network: host}}
  server: {build: {network: host}}
  locust-master: {build: {network: host}}
"""
DIGITS = 100
MONITORING = ("--profile", "monitoring")


class Stack:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.times: dict[str, float] = {}
        override = workdir / "standin.yml"
        override.write_text(BUILD_ON_HOST)
        self.files = [*FILES, "-f", str(override)]

    def compose(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["docker", "compose", "-p", PROJECT, *self.files, *args],
                                cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                env=self.env)
        assert result.returncode == 0, f"compose {' '.join(args)}:\n{result.stdout[-3000:]}" \
                                       f"\n{result.stderr[-5000:]}"
        return result

    def timed(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = self.compose(*args)
        self.times[name] = round(time.monotonic() - started, 1)
        return result

    def container(self, service: str) -> dict:  # type: ignore[type-arg]
        ids = self.compose("ps", "-a", "-q", service).stdout.split()
        assert ids, f"no {service} container"
        found = subprocess.run(["docker", "inspect", ids[0]], capture_output=True, text=True,
                               timeout=60, check=True)
        return dict(json.loads(found.stdout)[0])


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    workdir = scratch()
    with ExitStack() as stack_:
        started = stack_.enter_context(engine(workdir))
        index = stack_.enter_context(torch_index(workdir))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNNSERVE_", "LOCUST_"))}
        env.update(compose_plugin(workdir), TRAIN_MODELS="lenet", TRAIN_PRESET="quick")
        if index:
            env["TORCH_INDEX_URL"] = index
        s = Stack(workdir, env)
        s.times.update(started)
        s.times["standin_base_s"] = round(standin_base(workdir), 1)
        s.compose("down", "-v", "--remove-orphans")
        s.timed("build_s", "build")
        s.timed("up_s", "up", "-d", "--wait", "--wait-timeout", "900")
        try:
            yield s
        finally:
            (ROOT / "runs").mkdir(exist_ok=True)
            (ROOT / "runs" / "stack-times.json").write_text(json.dumps(s.times, indent=1))
            subprocess.run(["docker", "compose", "-p", PROJECT, *s.files, *MONITORING, "down",
                            "-v", "--remove-orphans"], cwd=ROOT, env=env,
                           capture_output=True, timeout=300)
    shutil.rmtree(workdir, ignore_errors=True)


def test_the_server_image_has_no_torch_no_compiler_and_runs_as_10001(stack: Stack) -> None:
    probe = ("import importlib.util as u, os, shutil; "
             "print(u.find_spec('torch') is None, shutil.which('gcc') is None "
             "and shutil.which('cc') is None, os.getuid())")
    for image in ("cnnserve/server-cpu:0.1.0", "cnnserve/loadtest:0.1.0"):
        out = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", image, "-c",
                              probe], capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == ["True", "True", "10001"], (image, out.stdout, out.stderr)


def test_real_clients_classify_held_out_digits_through_the_published_ports(
        stack: Stack) -> None:
    repo = stack.workdir / "models"
    stack.compose("cp", "server:/models", str(repo))
    inputs = real_inputs(repo, "lenet")
    x = inputs.images[:DIGITS]
    labels = load_dataset("mnist5k").test.labels[:DIGITS]
    before = urllib.request.urlopen("http://127.0.0.1:8002/metrics", timeout=10).read().decode()
    g = triton_grpc.InferenceServerClient("127.0.0.1:8001")
    h = triton_http.InferenceServerClient("127.0.0.1:8000")
    assert g.is_model_ready("lenet") and h.is_model_ready("lenet")
    for client, module in ((g, triton_grpc), (h, triton_http)):
        predicted = []
        for batch in np.split(x, DIGITS // 25):  # within the model's max_batch_size
            tensor = module.InferInput(inputs.name, list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            result = client.infer("lenet", [tensor])
            response = result.get_response()
            output = response["outputs"][0]["name"] if module is triton_http \
                else response.outputs[0].name
            predicted += list(np.argmax(result.as_numpy(output), axis=1))
        right = int((np.asarray(predicted) == labels).sum())
        assert right >= 95, f"{module.__name__}: {right} of {DIGITS} right"
    after = urllib.request.urlopen("http://127.0.0.1:8002/metrics", timeout=10).read().decode()
    name = "cnnserve_requests_total"
    counted = metric(after, name) - (metric(before, name) if f"{name}{{" in before else 0)
    assert counted >= 2, f"/metrics counted {counted} calls for lenet, not the 2 made"


def _locust(path: str, data: bytes | None = None) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:8089{path}", data=data, timeout=10) as r:
        return dict(json.loads(r.read()))


def test_the_locust_master_ui_swarms_on_its_worker_without_failures(stack: Stack) -> None:
    wait_until(lambda: len(_locust("/stats/requests").get("workers", [])) >= 1, timeout=60)
    _locust("/swarm", b"user_count=4&spawn_rate=4&host=server%3A8001")
    aggregated = {}

    def counted() -> bool:
        nonlocal aggregated
        stats = _locust("/stats/requests")["stats"]
        aggregated = next(s for s in stats if s["name"] == "Aggregated")
        return bool(aggregated["num_requests"] >= 200)

    wait_until(counted, timeout=60)
    _locust("/stop", b"")
    assert aggregated["num_failures"] == 0, aggregated


def test_the_monitoring_profiles_prometheus_scrapes_the_server(stack: Stack) -> None:
    """Prometheus runs with deploy/prometheus/prometheus.yml and scrapes the server over
    the compose network. Its image is a stand-in built from Debian's package (no
    registry here), and Grafana, the profile's other service, cannot be had at all."""
    stack.times["standin_prometheus_s"] = round(standin_prometheus(stack.workdir), 1)
    stack.timed("monitoring_up_s", *MONITORING, "up", "-d", "--no-deps", "prometheus")
    prometheus = "http://127.0.0.1:9090/api/v1"
    targets: list[dict] = []  # type: ignore[type-arg]

    def scraped() -> bool:
        nonlocal targets
        try:
            with urllib.request.urlopen(f"{prometheus}/targets", timeout=5) as answer:
                targets = json.loads(answer.read())["data"]["activeTargets"]
        except OSError:
            return False  # not listening yet
        return any(t["labels"]["job"] == "cnnserve" and t["health"] == "up" for t in targets)

    wait_until(scraped, timeout=90)
    assert [t["scrapeUrl"] for t in targets] == ["http://server:8002/metrics"], targets
    query = urllib.parse.quote('sum(cnnserve_requests_total{model="lenet"})')
    with urllib.request.urlopen(f"{prometheus}/query?query={query}", timeout=10) as answer:
        result = json.loads(answer.read())["data"]["result"]
    assert result and float(result[0]["value"][1]) >= 2, result  # the classify test's calls


def test_second_up_reuses_the_models_and_stop_drains_at_once(stack: Stack) -> None:
    stack.timed("second_up_s", "up", "-d", "--wait", "--wait-timeout", "300")
    trainer = stack.container("trainer")["State"]
    assert trainer["ExitCode"] == 0
    ran = (np.datetime64(trainer["FinishedAt"][:26]) - np.datetime64(trainer["StartedAt"][:26]))
    assert ran < np.timedelta64(60, "s"), f"the trainer retrained: it ran {ran}"
    # Requests in flight while SIGTERM arrives, from a client that then stays connected.
    channel = grpc.insecure_channel("127.0.0.1:8001")
    stub = triton_grpc.service_pb2_grpc.GRPCInferenceServiceStub(channel)
    inputs = real_inputs(stack.workdir / "models", "lenet")
    request = triton_grpc.service_pb2.ModelInferRequest(
        model_name="lenet", inputs=[triton_grpc.service_pb2.ModelInferRequest.InferInputTensor(
            name=inputs.name, datatype="FP32", shape=[32, *inputs.images.shape[1:]])],
        raw_input_contents=[np.ascontiguousarray(inputs.images[:32]).tobytes()])
    outcomes: list[str] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                stub.ModelInfer(request, timeout=15)
                outcomes.append("OK")
            except grpc.RpcError as e:
                outcomes.append(e.code().name)
                return

    callers = [threading.Thread(target=caller) for _ in range(4)]
    for t in callers:
        t.start()
    wait_until(lambda: outcomes.count("OK") >= 20, timeout=60)
    stack.timed("stop_s", "stop", "server")
    stop.set()
    for t in callers:
        t.join(timeout=30)
    server = stack.container("server")["State"]
    assert server["ExitCode"] == 0, server
    assert stack.times["stop_s"] < 9, f"stop took {stack.times['stop_s']} s: the drain " \
                                      "waited for its 10 s grace period"
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    channel.close()
    stack.timed("down_s", *MONITORING, "down", "-v", "--remove-orphans")
    for kind in ("ps -a", "network ls", "volume ls"):
        left = subprocess.run(["docker", *kind.split(), "-q", "--filter",
                               f"label=com.docker.compose.project={PROJECT}"],
                              capture_output=True, text=True, timeout=60, check=True)
        assert not left.stdout.strip(), f"docker {kind} still lists {left.stdout}"
