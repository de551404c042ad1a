"""Triton's protocol extensions as its own client uses them: streaming, system shared
memory and model control."""

from __future__ import annotations

import base64
import os
import queue
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from service.memory.cuda import CudaSharedMemoryRegistry
from tests.servers import ServerProcess
from tests.service.frontends.test_grpc_inference import direct
from tests.service.oip import request, stub_for

X = np.random.default_rng(5).standard_normal((3, 1, 28, 28)).astype(np.float32)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.address)


def infer_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_a_stream_answers_each_request_by_id_and_goes_on_after_a_failure(
        client: triton.InferenceServerClient, served_repo: Path, server: ServerProcess) -> None:
    answers: queue.Queue[tuple[triton.InferResult | None, Exception | None]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(40):
            client.async_stream_infer("lenet", [infer_input(X)], request_id=f"r{i}")
        client.async_stream_infer("lenet", [infer_input(X[:, :, :27])], request_id="bad")
        client.async_stream_infer("lenet", [infer_input(X)], request_id="after")
        got = [answers.get(timeout=30) for _ in range(42)]
    finally:
        client.stop_stream()
    results = {r.get_response().id: r for r, _ in got if r is not None}
    errors = [str(e) for _, e in got if e is not None]
    assert set(results) == {f"r{i}" for i in range(40)} | {"after"}
    assert len(errors) == 1 and "INVALID_ARGUMENT" in errors[0] and "shape" in errors[0]
    expected = direct(served_repo, "lenet", X)
    for result in results.values():
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    counted = [line for line in server.metrics().splitlines()
               if 'api="oip_stream"' in line and "requests_total" in line]
    assert any('code="INVALID_ARGUMENT"' in line for line in counted), counted


@pytest.fixture
def regions() -> Iterator[Callable[[int], tuple[str, object]]]:
    """Creates POSIX shared memory objects, and removes them after the test."""
    made: list[object] = []

    def make(byte_size: int) -> tuple[str, object]:
        key = f"/cnnserve-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key.strip("/"), key, byte_size)
        made.append(handle)
        return key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def test_tensors_travel_through_system_shared_memory(
        client: triton.InferenceServerClient, served_repo: Path,
        regions: Callable[[int], tuple[str, object]]) -> None:
    in_key, in_handle = regions(X.nbytes)
    out_key, out_handle = regions(1024)
    shm.set_shared_memory_region(in_handle, [X])
    client.register_system_shared_memory("in", in_key, X.nbytes)
    client.register_system_shared_memory("out", out_key, 1024)
    try:
        status = client.get_system_shared_memory_status()
        assert {r.name: (r.key, r.byte_size) for r in status.regions.values()} == {
            "in": (in_key, X.nbytes), "out": (out_key, 1024)}
        tensor = triton.InferInput("input", list(X.shape), "FP32")
        tensor.set_shared_memory("in", X.nbytes)
        wanted = triton.InferRequestedOutput("logits")
        wanted.set_shared_memory("out", 1024)
        result = client.infer("lenet", [tensor], outputs=[wanted])
        output = result.get_output("logits")
        assert list(output.shape) == [3, 10]
        logits = shm.get_contents_as_numpy(out_handle, np.float32, [3, 10])
        np.testing.assert_allclose(logits, direct(served_repo, "lenet", X), rtol=1e-5, atol=1e-5)
        small = triton.InferRequestedOutput("logits")
        small.set_shared_memory("out", 16)
        with pytest.raises(InferenceServerException, match="needs 120 bytes"):
            client.infer("lenet", [tensor], outputs=[small])
    finally:
        client.unregister_system_shared_memory()
    assert not client.get_system_shared_memory_status().regions


@pytest.mark.parametrize(("key", "offset", "size", "code", "message"), [
    ("/../../etc/passwd", 0, 8, grpc.StatusCode.INVALID_ARGUMENT, "must be one name"),
    ("/cnnserve-no-such-region", 0, 8, grpc.StatusCode.NOT_FOUND, "cannot be opened"),
    (None, 0, 4096, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the 64 bytes"),
    (None, 60, 8, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the 64 bytes"),
])
def test_hostile_registrations_are_refused(
        server: ServerProcess, regions: Callable[[int], tuple[str, object]], key: str | None,
        offset: int, size: int, code: grpc.StatusCode, message: str) -> None:
    real_key, _ = regions(64)
    with pytest.raises(grpc.RpcError) as err:
        stub_for(server).SystemSharedMemoryRegister(service_pb2.SystemSharedMemoryRegisterRequest(
            name="hostile", key=key or real_key, offset=offset, byte_size=size), timeout=10)
    assert err.value.code() == code and message in (err.value.details() or "")


def test_requests_cannot_reach_past_a_region_or_name_an_unknown_one(
        server: ServerProcess, regions: Callable[[int], tuple[str, object]]) -> None:
    key, _ = regions(X[:1].nbytes)
    stub = stub_for(server)
    stub.SystemSharedMemoryRegister(service_pb2.SystemSharedMemoryRegisterRequest(
        name="small", key=key, byte_size=X[:1].nbytes), timeout=10)
    try:
        for region, size, code in (("small", X.nbytes, grpc.StatusCode.INVALID_ARGUMENT),
                                   ("nowhere", X[:1].nbytes, grpc.StatusCode.NOT_FOUND)):
            call = request(X[:1])
            del call.raw_input_contents[:]
            call.inputs[0].parameters["shared_memory_region"].string_param = region
            call.inputs[0].parameters["shared_memory_byte_size"].int64_param = size
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(call, timeout=10)
            assert err.value.code() == code
        with pytest.raises(grpc.RpcError) as err:
            stub.SystemSharedMemoryRegister(service_pb2.SystemSharedMemoryRegisterRequest(
                name="small", key=key, byte_size=8), timeout=10)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        stub.SystemSharedMemoryUnregister(service_pb2.SystemSharedMemoryUnregisterRequest(
            name="small"), timeout=10)


def test_an_object_shrunk_after_registration_is_refused_not_read_past_its_end(
        server: ServerProcess, regions: Callable[[int], tuple[str, object]]) -> None:
    key, _ = regions(X.nbytes)
    stub = stub_for(server)
    stub.SystemSharedMemoryRegister(service_pb2.SystemSharedMemoryRegisterRequest(
        name="shrinking", key=key, byte_size=X.nbytes), timeout=10)
    try:
        os.truncate(f"/dev/shm/{key.lstrip('/')}", 0)  # reading past it would be SIGBUS
        call = request(X)
        del call.raw_input_contents[:]
        call.inputs[0].parameters["shared_memory_region"].string_param = "shrinking"
        call.inputs[0].parameters["shared_memory_byte_size"].int64_param = X.nbytes
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(call, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shrank to 0 bytes" in (err.value.details() or "")
        assert stub.ModelInfer(request(X), timeout=10).outputs  # still serving
    finally:
        stub.SystemSharedMemoryUnregister(service_pb2.SystemSharedMemoryUnregisterRequest(
            name="shrinking"), timeout=10)


def test_load_and_unload_need_explicit_model_control(
        client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="model-control-mode explicit"):
        client.load_model("lenet")


def test_loads_and_unloads_under_load_answer_every_accepted_request(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--model-control-mode", "explicit",
                            "--load-model", "lenet")
    client = triton.InferenceServerClient(server.address)
    assert client.is_server_ready() and not client.is_model_ready("alexnet")
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {"lenet": "READY", "alexnet": "UNAVAILABLE", "vgg11_bn": "UNAVAILABLE"}
    seen: dict[str, Counter[str]] = {"reload": Counter(), "unload": Counter()}
    phase = ["reload"]
    stop = threading.Event()
    stub = stub_for(server)

    def load() -> None:
        while not stop.is_set():
            try:
                stub.ModelInfer(request(X[:1]), timeout=30)
                seen[phase[0]]["OK"] += 1
            except grpc.RpcError as exc:
                seen[phase[0]][exc.code().name] += 1

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        for _ in range(3):
            client.load_model("lenet")  # a reload: swapped in beside the old version
        client.load_model("alexnet")
        phase[0] = "unload"
        for _ in range(2):
            client.unload_model("lenet")
            assert not client.is_model_ready("lenet")
            client.load_model("lenet")
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert set(seen["reload"]) == {"OK"} and seen["reload"]["OK"] > 0, seen
    assert set(seen["unload"]) <= {"OK", "NOT_FOUND", "UNAVAILABLE"}, seen
    assert client.is_model_ready("lenet") and client.is_model_ready("alexnet")
    with pytest.raises(InferenceServerException, match="no model 'resnet'"):
        client.load_model("resnet")
    client.unload_model("alexnet")
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index["alexnet"] == "UNLOADED" and index["lenet"] == "READY"
    assert server.terminate() == 0


@pytest.mark.skipif(CudaSharedMemoryRegistry().available(),
                    reason="this host has a GPU: see test_cuda.py")
def test_without_a_gpu_cuda_shared_memory_is_refused_clearly_and_clean_up_succeeds(
        client: triton.InferenceServerClient) -> None:
    client.unregister_cuda_shared_memory()  # what tritonclient and perf_analyzer clean up with
    assert not client.get_cuda_shared_memory_status().regions
    with pytest.raises(InferenceServerException, match="FAILED_PRECONDITION.*needs a GPU"):
        client.register_cuda_shared_memory("gpu", base64.b64encode(b"\0" * 64), 0, 64)
