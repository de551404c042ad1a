"""Hot reload: new versions and models appear, bad versions never replace good ones."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2

from contract.repository import MODEL_FILE, publish_version, version_dir
from tests.servers import ServerProcess
from tests.service.oip import logits, metric, request, stub_for, wait_until

X = np.random.default_rng(5).standard_normal((1, 1, 28, 28)).astype(np.float32)


@pytest.fixture
def repo(served_repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(served_repo, copy)
    return copy


def served_version(server: ServerProcess, model: str = "lenet") -> str:
    response = stub_for(server).ModelInfer(request(X, model), timeout=30)
    return response.model_version


def health(server: ServerProcess, name: str) -> int:
    """The health service's status for `name`; SERVICE_UNKNOWN until it is announced."""
    with grpc.insecure_channel(server.address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name), timeout=10).status
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def test_a_new_version_is_swapped_in_and_queued_requests_are_still_answered(
        repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(repo, "--reload-interval-s", "0.1", "--batching", "delay",
                            "--max-queue-delay-us", "1500000")
    stub = stub_for(server)
    with ThreadPoolExecutor(3) as pool:
        queued = [pool.submit(stub.ModelInfer, request(X), timeout=30) for _ in range(3)]
        wait_until(lambda: metric(server.metrics(), "cnnserve_queue_depth") == 3)
        publish_version(repo, "lenet", {MODEL_FILE: version_dir(repo, "lenet", 1) / MODEL_FILE})
        answers = [f.result(timeout=30) for f in queued]
    # Queued on version 1 before the swap: answered by version 1, none failed.
    assert [a.model_version for a in answers] == ["1", "1", "1"]
    wait_until(lambda: served_version(server) == "2", timeout=30)
    np.testing.assert_array_equal(logits(stub.ModelInfer(request(X), timeout=30)),
                                  logits(answers[0]))
    assert any("model lenet: version 2 now served (was 1)" in line for line in server.lines)


def test_a_bad_new_version_leaves_the_old_one_serving_until_a_good_one_arrives(
        repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(repo, "--reload-interval-s", "0.1", "--max-queue-delay-us", "0")
    publish_version(repo, "lenet", {MODEL_FILE: b"this is not an onnx model"})
    wait_until(lambda: any("model lenet version 2 not loaded, version 1 keeps serving" in line
                           for line in server.lines), timeout=30)
    assert served_version(server) == "1"
    assert health(server, "lenet") == health_pb2.HealthCheckResponse.SERVING
    publish_version(repo, "lenet", {MODEL_FILE: version_dir(repo, "lenet", 1) / MODEL_FILE})
    wait_until(lambda: served_version(server) == "3", timeout=30)
    assert server.terminate() == 0


def test_models_added_and_removed_from_the_repository_are_loaded_and_unloaded(
        repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(repo, "--reload-interval-s", "0.1", "--max-queue-delay-us", "0")
    shutil.rmtree(repo / "vgg11_bn")
    wait_until(lambda: health(server, "vgg11_bn") == health_pb2.HealthCheckResponse.NOT_SERVING,
               timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        stub_for(server).ModelInfer(request(np.zeros((1, 1, 32, 32), np.float32), "vgg11_bn"),
                                    timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # A new model: its config and a version, placed the way export publishes them.
    staging = repo / ".incoming"
    shutil.copytree(repo / "lenet", staging)
    config = (staging / "config.json").read_text().replace('"lenet"', '"lenet_copy"')
    (staging / "config.json").write_text(config)
    staging.rename(repo / "lenet_copy")
    wait_until(lambda: health(server, "lenet_copy") == health_pb2.HealthCheckResponse.SERVING,
               timeout=30)
    assert served_version(server, "lenet_copy") == "1"
    index = stub_for(server).RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=10)
    assert sorted(m.name for m in index.models) == ["alexnet", "lenet", "lenet_copy"]
    assert server.terminate() == 0
