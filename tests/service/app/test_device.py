"""`--device` as a user on a host without a GPU meets it: `cuda` refuses to start in one
line, `auto` serves on the CPU, says so once, and reports where each model runs."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton

from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc as pb_grpc
from service.engine.runtime import cuda_unusable_reason
from tests.servers import ROOT, ServerProcess, free_ports

UNUSABLE = cuda_unusable_reason()
pytestmark = pytest.mark.skipif(not UNUSABLE, reason="CUDA runs here: test_cuda.py covers it")
MODELS = {"lenet", "alexnet", "vgg11_bn"}


@pytest.mark.parametrize("extra", [(), ("--precision", "fp16"), ("--workers", "2")])
def test_device_cuda_without_a_gpu_is_one_line_and_exit_1(served_repo: Path,
                                                          extra: tuple[str, ...]) -> None:
    port, http, metrics, probes = free_ports(4)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "service", "--repo", str(served_repo), "--device", "cuda",
         "--port", str(port), "--http-port", str(http), "--metrics-port", str(metrics),
         "--probe-port", str(probes), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"error: --device cuda: {UNUSABLE}"], result.stderr
    assert result.stdout == ""


def test_device_auto_serves_on_the_cpu_says_so_once_and_reports_it(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--device", "auto", "--precision", "fp16")
    warnings = [line for line in server.lines if " WARNING " in line]
    assert len(warnings) == 1, warnings
    assert f"device auto: serving every model on the CPU, since {UNUSABLE}" in warnings[0]
    listed = pb_grpc.ClassifierStub(grpc.insecure_channel(server.address)).ListModels(
        pb.ListModelsRequest(), timeout=10).models
    assert {(m.name, m.provider) for m in listed} == {(m, "CPUExecutionProvider")
                                                     for m in MODELS}
    placed = re.findall(r'cnnserve_model_info\{file="([^"]+)",model="([^"]+)",'
                        r'provider="([^"]+)",version="1"\} 1\.0', server.metrics())
    assert sorted(placed) == sorted(("model.onnx", m, "CPUExecutionProvider") for m in MODELS)
    client = triton.InferenceServerClient(server.address)
    for name in MODELS:
        config = client.get_model_config(name).config
        assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
        assert config.parameters["model_file"].string_value == "model.onnx"
        assert [g.kind for g in config.instance_group] == [2]  # KIND_CPU
        assert not config.instance_group[0].gpus
    assert "cuda_shared_memory" not in client.get_server_metadata().extensions
    assert server.terminate() == 0
