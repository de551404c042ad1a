"""The Open Inference Protocol, driven by tritonclient and by the protocol's own messages."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from contract.repository import MODEL_FILE
from tests.conftest import TINY_CONFIGS
from tests.servers import ServerProcess

SHAPES = {"lenet": (1, 28, 28), "alexnet": (1, 64, 64), "vgg11_bn": (1, 32, 32)}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.address)


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))


def direct(repo: Path, name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo / name / "1" / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def triton_input(x: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def test_health_and_metadata_through_tritonclient(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "cnnserve"
    assert set(client.get_server_metadata().extensions) == {
        "model_configuration", "model_repository", "statistics", "system_shared_memory"}
    for name, shape in SHAPES.items():
        assert client.is_model_ready(name) and client.is_model_ready(name, "1")
        assert not client.is_model_ready(name, "7")
        meta = client.get_model_metadata(name)
        assert meta.versions == ["1"] and meta.platform == "onnxruntime_onnx"
        assert (meta.inputs[0].name, meta.inputs[0].datatype) == ("input", "FP32")
        assert list(meta.inputs[0].shape) == [-1, *shape]
        assert list(meta.outputs[0].shape) == [-1, 10]
    assert not client.is_model_ready("missing")


def test_model_config_through_tritonclient_is_the_served_configuration(
        client: triton.InferenceServerClient, served_repo: Path) -> None:
    import json

    for name, shape in SHAPES.items():
        config = client.get_model_config(name).config
        declared = json.loads((served_repo / name / "config.json").read_text())
        assert (config.name, config.platform, config.backend) == (
            name, "onnxruntime_onnx", "onnxruntime")
        assert config.max_batch_size == declared["max_batch_size"]
        (tensor_in,), (tensor_out,) = config.input, config.output
        assert (tensor_in.name, list(tensor_in.dims)) == ("input", list(shape))  # no batch
        assert (tensor_out.name, list(tensor_out.dims)) == (declared["outputs"][0]["name"], [10])
        assert tensor_in.data_type == tensor_out.data_type == 11  # TYPE_FP32
        assert list(config.dynamic_batching.preferred_batch_size) == sorted(
            declared["preferred_batch_sizes"])
        # Work-conserving (the default): a lone request never waits, but under load a batch
        # waits up to this long for its callers to come back.
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        (group,) = config.instance_group
        assert (group.count, group.kind) == (1, 2)  # one instance, KIND_CPU
        assert config.version_policy.latest.num_versions == 1
        assert client.get_model_config(name, "1").config == config
    with pytest.raises(InferenceServerException, match="StatusCode.NOT_FOUND"):
        client.get_model_config("missing")


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tritonclient_infer_matches_onnxruntime(client: triton.InferenceServerClient,
                                                served_repo: Path, name: str) -> None:
    x = np.random.default_rng(0).standard_normal((5, *SHAPES[name])).astype(np.float32)
    result = client.infer(name, [triton_input(x)], model_version="1", request_id="req-7",
                          outputs=[triton.InferRequestedOutput("logits")],
                          client_timeout=30, priority=3)
    assert result.get_response().id == "req-7"
    np.testing.assert_allclose(result.as_numpy("logits"), direct(served_repo, name, x),
                               rtol=1e-5, atol=1e-5)


def test_typed_fp32_contents_give_the_same_answer(
        stub: service_pb2_grpc.GRPCInferenceServiceStub, served_repo: Path) -> None:
    x = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="lenet", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=list(x.shape),
            contents=service_pb2.InferTensorContents(fp32_contents=x.ravel().tolist()))])
    request.parameters["priority"].uint64_param = 1
    response = stub.ModelInfer(request, timeout=30)
    assert list(response.outputs[0].shape) == [2, 10]
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(logits, direct(served_repo, "lenet", x), rtol=1e-5, atol=1e-5)


def raw_request(model: str = "lenet", shape: tuple[int, ...] = (1, 1, 28, 28),
                datatype: str = "FP32", data: bytes | None = None, name: str = "input",
                version: str = "") -> service_pb2.ModelInferRequest:
    count = int(np.prod(shape))
    return service_pb2.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype,
                                                               shape=list(shape))],
        raw_input_contents=[data if data is not None else bytes(4 * count)])


@pytest.mark.parametrize(("request_", "code", "message"), [
    (raw_request(model="resnet"), grpc.StatusCode.NOT_FOUND, "unknown model 'resnet'"),
    (raw_request(version="9"), grpc.StatusCode.NOT_FOUND, "no served version '9'"),
    (raw_request(shape=(1, 1, 27, 28)), grpc.StatusCode.INVALID_ARGUMENT,
     r"shape \[N, 1, 28, 28\] \(each dim >= 1\), got \[1, 1, 27, 28\]"),
    (raw_request(shape=(0, 1, 28, 28)), grpc.StatusCode.INVALID_ARGUMENT,
     r"\(each dim >= 1\), got \[0, 1, 28, 28\]"),
    (raw_request(datatype="INT64"), grpc.StatusCode.INVALID_ARGUMENT,
     "datatype FP32, got 'INT64'"),
    (raw_request(data=b"\0" * 100), grpc.StatusCode.INVALID_ARGUMENT,
     "needs 3136 bytes of little-endian FP32, got 100"),
    (raw_request(name="images"), grpc.StatusCode.INVALID_ARGUMENT,
     r"takes inputs \['input'\], got \['images'\]"),
    (raw_request(shape=(33, 1, 28, 28)), grpc.StatusCode.INVALID_ARGUMENT,
     "at most 32 images per request"),
    (raw_request(shape=(2**62, 1, 28, 28), data=b""), grpc.StatusCode.INVALID_ARGUMENT,
     "at most 32 images per request"),
])
def test_bad_requests_get_clear_statuses(stub: service_pb2_grpc.GRPCInferenceServiceStub,
                                         request_: service_pb2.ModelInferRequest,
                                         code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_, timeout=30)
    assert err.value.code() == code
    assert re.search(message, err.value.details()), err.value.details()


def test_raw_and_typed_data_together_is_refused(
        stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 784)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send its data in one place" in (err.value.details() or "")


def test_tritonclient_sees_errors_as_exceptions(client: triton.InferenceServerClient) -> None:
    x = np.zeros((1, 1, 28, 28), dtype=np.int64)
    with pytest.raises(InferenceServerException, match="datatype FP32, got 'INT64'"):
        client.infer("lenet", [triton_input(x, "INT64")])


def test_statistics_and_repository_index(stub: service_pb2_grpc.GRPCInferenceServiceStub,
                                         client: triton.InferenceServerClient) -> None:
    before = client.get_inference_statistics("lenet").model_stats[0]
    client.infer("lenet", [triton_input(np.zeros((3, 1, 28, 28), dtype=np.float32))])
    after = client.get_inference_statistics("lenet").model_stats[0]
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count == before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    # Triton's semantics, which perf_analyzer checks: queue and the three compute phases
    # count once per request answered; batch_stats once per execution of that size.
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        grew = getattr(after.inference_stats, phase).count - getattr(
            before.inference_stats, phase).count
        assert grew == 1, phase
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    batch = {b.batch_size: b for b in after.batch_stats}[3]
    assert batch.compute_input.count == batch.compute_infer.count == batch.compute_output.count
    assert batch.compute_infer.count >= 1
    index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=10)
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("alexnet", "1", "READY"), ("lenet", "1", "READY"), ("vgg11_bn", "1", "READY")]
