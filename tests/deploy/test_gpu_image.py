"""The GPU server image, as `docker compose up` builds it for a GPU host (python:slim,
onnxruntime-gpu and the CUDA 13 libraries from PyPI, so that the host gives only its
driver), built and started here, where no GPU is: `--device cuda` exits 1 in one line,
`auto` serves on the CPU and says so once.

About 3.5 GB of image, so it is a command of its own (`make gpu-image`), outside the
suite; it needs a container engine as tests/deploy/engine.py provides one."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc as pb_grpc
from tests.deploy.engine import engine, scratch, standin_base, torch_index
from tests.servers import ROOT

pytestmark = pytest.mark.gpu_image
IMAGE = "cnnserve/server:gpu-check"
PROVIDER_NEEDS = """
import ctypes, importlib.metadata as md, pathlib, onnxruntime as ort
names = sorted(d.metadata["Name"].lower() for d in md.distributions())
print([n for n in names if n.startswith("onnxruntime")])
print([n for n in names if n.startswith("nvidia-")])
ort.preload_dlls()
try:
    ctypes.CDLL(str(pathlib.Path(ort.__file__).parent / "capi" /
                    "libonnxruntime_providers_cuda.so"))
    print("loaded")
except OSError as exc:
    print(exc)
"""


def docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    workdir = scratch()
    with ExitStack() as stack:
        stack.enter_context(engine(workdir))
        standin_base(workdir)
        # The classic builder (Docker 20.10 without buildx) builds the stages before the
        # target too: the trainer's torch comes from this machine's wheels.
        index = stack.enter_context(torch_index(workdir))
        started = time.monotonic()
        built = docker("build", "--network", "host", "--target", "server", "-t", IMAGE,
                       *(["--build-arg", f"TORCH_INDEX_URL={index}"] if index else []),
                       str(ROOT), timeout=2400)
        assert built.returncode == 0, built.stderr[-5000:]
        size = docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout.strip()
        (ROOT / "runs").mkdir(exist_ok=True)
        (ROOT / "runs" / "gpu-image.json").write_text(json.dumps(
            {"build_s": round(time.monotonic() - started, 1), "bytes": int(size)}))
        try:
            yield IMAGE
        finally:
            docker("rmi", "-f", IMAGE)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def models(served_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository, readable by the image's user (10001)."""
    folder = tmp_path_factory.mktemp("gpu-image")
    folder.chmod(0o755)
    repo = folder / "models"
    shutil.copytree(served_repo, repo)
    subprocess.run(["chmod", "-R", "a+rX", str(repo)], check=True)
    return repo


def test_one_onnxruntime_and_every_library_its_cuda_provider_needs_but_the_driver(
        image: str) -> None:
    result = docker("run", "--rm", image, "python", "-c", PROVIDER_NEEDS)
    assert result.returncode == 0, result.stderr
    distributions, nvidia, loaded = result.stdout.splitlines()[-3:]
    assert distributions == "['onnxruntime-gpu']"
    for wheel in ("nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-curand"):
        assert f"'{wheel}'" in nvidia, nvidia
    # Everything the provider links against is in the image; only the driver's library,
    # which the NVIDIA container toolkit mounts from the host, is missing here.
    assert loaded.startswith("libcuda.so.1: cannot open shared object file"), loaded


def test_device_cuda_without_a_gpu_exits_1_in_one_line(image: str, models: Path) -> None:
    started = time.monotonic()
    result = docker("run", "--rm", "-v", f"{models}:/models:ro", "-e", "CNNSERVE_DEVICE=cuda",
                    image)
    assert time.monotonic() - started < 60
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "error: --device cuda: no NVIDIA driver here (libcuda.so.1 is not on the library "
        "path)"], result.stderr


def test_device_auto_serves_on_the_cpu_and_says_so(image: str, models: Path) -> None:
    started = docker("run", "-d", "-v", f"{models}:/models:ro", "-p", "127.0.0.1::8001",
                     image)
    assert started.returncode == 0, started.stderr
    container = started.stdout.strip()
    try:
        port = docker("port", container, "8001/tcp").stdout.split(":")[-1].strip()
        stub = pb_grpc.ClassifierStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        deadline = time.monotonic() + 180
        while True:
            try:
                listed = stub.ListModels(pb.ListModelsRequest(), timeout=5).models
                if listed and all(m.ready for m in listed):
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, docker("logs", container).stderr[-3000:]
            time.sleep(0.5)
        assert {m.provider for m in listed} == {"CPUExecutionProvider"}
        logs = docker("logs", container)
        warnings = [line for line in (logs.stdout + logs.stderr).splitlines()
                    if " WARNING service.engine" in line]  # the edge warns of plaintext
        assert len(warnings) == 1 and "device auto: serving every model on the CPU" \
            in warnings[0], warnings
        stopped = docker("stop", "-t", "30", container)
        assert stopped.returncode == 0
        assert docker("inspect", "-f", "{{.State.ExitCode}}", container).stdout.strip() == "0"
    finally:
        docker("rm", "-f", container)
