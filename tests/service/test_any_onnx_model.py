"""ONNX models this project did not export: served over the inference protocol, their
inputs and outputs taken from the graph, as Triton serves them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from contract.repository import MODEL_FILE
from protos import classifier_pb2 as cpb
from protos import classifier_pb2_grpc as cpb_grpc
from tests.servers import ServerProcess, start_server

ALL_TYPES = {"BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8,
             "UINT16": TensorProto.UINT16, "UINT32": TensorProto.UINT32,
             "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
             "INT16": TensorProto.INT16, "INT32": TensorProto.INT32,
             "INT64": TensorProto.INT64, "FP16": TensorProto.FLOAT16,
             "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE}
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
         "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
         "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


def _save(repo: Path, name: str, graph: onnx.GraphProto, opset: int = 17) -> None:
    folder = repo / name / "1"
    folder.mkdir(parents=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / MODEL_FILE))


def _sklearn(repo: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    classifier = LogisticRegression(max_iter=500).fit(x, y)
    model = to_onnx(classifier, x[:1].astype(np.float32), options={"zipmap": False},
                    target_opset=17)
    (repo / "iris" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "iris" / "1" / MODEL_FILE))


def _two_in_two_out(repo: Path) -> None:
    """x FP32 [N, 3] and k INT64 [N, 1] in; y = x * k (FP32) and z = k + k (INT64) out."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "kf"], ["y"]),
         helper.make_node("Add", ["k", "k"], ["z"])], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("k", TensorProto.INT64, ["n", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("z", TensorProto.INT64, ["n", 1])])
    _save(repo, "two", graph)


def _fixed_batch(repo: Path) -> None:
    """A fixed first dimension of 1: Triton's max_batch_size 0, no batching."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1)], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 1])])
    _save(repo, "fixed", graph)


def _fp16(repo: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])], "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 8])],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT16, [], [2.0])])
    _save(repo, "half", graph)


def _every_datatype(repo: Path) -> None:
    """One input per datatype, each passed through to an output of its own."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in ALL_TYPES], "types",
        [helper.make_tensor_value_info(f"in_{t}", code, ["n", 2]) for t, code in ALL_TYPES.items()],
        [helper.make_tensor_value_info(f"out_{t}", code, ["n", 2])
         for t, code in ALL_TYPES.items()])
    _save(repo, "types", graph)
    (repo / "types" / "config.json").write_text(json.dumps({"max_batch_size": 4}))


def _images(repo: Path) -> None:
    """224x224 RGB batches in, each image's channel means out."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["means"], axes=[2, 3], keepdims=0)],
        "images", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                 ["n", 3, 224, 224])],
        [helper.make_tensor_value_info("means", TensorProto.FLOAT, ["n", 3])])
    _save(repo, "images", graph)


@pytest.fixture(scope="module")
def plain_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("plain-repo")
    for build in (_sklearn, _two_in_two_out, _fixed_batch, _fp16, _every_datatype, _images):
        build(repo)
    return repo


@pytest.fixture(scope="module")
def plain_server(plain_repo: Path) -> Iterator[ServerProcess]:
    server = start_server(plain_repo)
    yield server
    assert server.terminate() == 0, "".join(server.lines)


@pytest.fixture(scope="module")
def client(plain_server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(plain_server.address)


def direct(repo: Path, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(repo / name / "1" / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def infer(client: triton.InferenceServerClient, name: str, feeds: dict[str, np.ndarray],
          outputs: list[str] | None = None) -> triton.InferResult:
    inputs = []
    for key, value in feeds.items():
        datatype = next(t for t, np_type in NUMPY.items() if value.dtype == np_type)
        tensor = triton.InferInput(key, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    wanted = [triton.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(name, inputs, outputs=wanted)


def test_every_model_is_served_and_the_server_is_ready(
        client: triton.InferenceServerClient) -> None:
    assert client.is_server_ready()
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {name: "READY"
                     for name in ("fixed", "half", "images", "iris", "two", "types")}


def test_a_scikit_learn_model_answers_as_onnxruntime_does(
        client: triton.InferenceServerClient, plain_repo: Path) -> None:
    x = np.random.default_rng(0).uniform(0, 7, (5, 4)).astype(np.float32)
    result = infer(client, "iris", {"X": x})
    label, probabilities = direct(plain_repo, "iris", {"X": x})
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=1e-6)
    meta = client.get_model_metadata("iris")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("X", "FP32", [-1, 4])]


def test_two_inputs_of_different_datatypes_and_two_outputs(
        client: triton.InferenceServerClient, plain_repo: Path) -> None:
    rng = np.random.default_rng(1)
    feeds: dict[str, np.ndarray] = {"x": rng.standard_normal((3, 3)).astype(np.float32),
             "k": rng.integers(-5, 5, (3, 1)).astype(np.int64)}
    result = infer(client, "two", feeds)
    y, z = direct(plain_repo, "two", feeds)
    np.testing.assert_allclose(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("z"), z)
    only_z = infer(client, "two", feeds, outputs=["z"])
    assert only_z.as_numpy("y") is None
    np.testing.assert_array_equal(only_z.as_numpy("z"), z)
    config = client.get_model_config("two").config
    assert config.max_batch_size == 32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("x", 11, [3]), ("k", 9, [1])]  # TYPE_FP32, TYPE_INT64


def test_a_fixed_batch_of_one_is_served_without_batching(
        client: triton.InferenceServerClient, plain_repo: Path) -> None:
    config = client.get_model_config("fixed").config
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 4]
    x = np.arange(4, dtype=np.float32)[None]
    np.testing.assert_allclose(infer(client, "fixed", {"x": x}).as_numpy("total"), [[6.0]])
    with pytest.raises(InferenceServerException, match=r"shape \[1, 4\]"):
        infer(client, "fixed", {"x": np.zeros((2, 4), np.float32)})


def test_fp16_in_and_out(client: triton.InferenceServerClient, plain_repo: Path) -> None:
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float16)
    out = infer(client, "half", {"x": x}).as_numpy("y")
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, direct(plain_repo, "half", {"x": x})[0])


def test_every_datatype_travels_bit_exact(client: triton.InferenceServerClient) -> None:
    rng = np.random.default_rng(3)
    feeds = {f"in_{t}": (rng.integers(0, 2, (3, 2)).astype(np.bool_) if t == "BOOL" else
                         rng.integers(0, 100, (3, 2)).astype(np_type))
             for t, np_type in NUMPY.items()}
    result = infer(client, "types", feeds)
    for t in NUMPY:
        out = result.as_numpy(f"out_{t}")
        assert out.dtype == feeds[f"in_{t}"].dtype, t
        np.testing.assert_array_equal(out, feeds[f"in_{t}"])
    assert client.get_model_config("types").config.max_batch_size == 4  # from config.json


def test_typed_contents_are_range_checked(plain_server: ServerProcess) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(plain_server.address))
    tensor = service_pb2.ModelInferRequest.InferInputTensor

    def call(k: list[int]) -> service_pb2.ModelInferResponse:
        return stub.ModelInfer(service_pb2.ModelInferRequest(model_name="two", inputs=[
            tensor(name="x", datatype="FP32", shape=[1, 3],
                   contents=service_pb2.InferTensorContents(fp32_contents=[1, 2, 3])),
            tensor(name="k", datatype="INT64", shape=[1, 1],
                   contents=service_pb2.InferTensorContents(int64_contents=k))]), timeout=10)

    answer = call([2])
    assert np.frombuffer(answer.raw_output_contents[0], "<f4").tolist() == [2, 4, 6]
    with pytest.raises(grpc.RpcError) as err:
        call([1, 2])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 1 int64_contents values, got 2" in (err.value.details() or "")
    int8 = service_pb2.ModelInferRequest(model_name="types", inputs=[
        tensor(name=f"in_{t}", datatype=t, shape=[1, 2],
               contents=service_pb2.InferTensorContents(int_contents=[300, 1]))
        for t in ("INT8",)])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(int8, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_classifier_api_refuses_a_model_without_labels(plain_server: ServerProcess) -> None:
    stub = cpb_grpc.ClassifierStub(grpc.insecure_channel(plain_server.address))
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(cpb.PredictRequest(model="iris", images=[
            cpb.Image(tensor=cpb.Tensor(shape=[4], data=[1, 2, 3, 4]))]), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_model_that_cannot_be_served_is_unready_with_its_reason(
        plain_repo: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(plain_repo / "two", tmp_path / "two")
    (tmp_path / "two" / "config.json").write_text(json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}]}))  # k left out
    shutil.copytree(plain_repo / "fixed", tmp_path / "fixed")
    server = start_server(tmp_path)
    try:
        assert any("not ready: model two" in line for line in server.lines)
        client = triton.InferenceServerClient(server.address)
        assert not client.is_server_ready()
        assert client.is_model_ready("fixed") and not client.is_model_ready("two")
        (entry,) = [m for m in client.get_model_repository_index().models if m.name == "two"]
        assert entry.state == "UNAVAILABLE" and "['k'] are not in the config" in entry.reason
    finally:
        assert server.terminate() == 0


def test_a_batch_of_224x224_images_travels_in_system_shared_memory(
        client: triton.InferenceServerClient, plain_repo: Path) -> None:
    import tritonclient.utils.shared_memory as shm

    x = np.random.default_rng(4).uniform(0, 1, (8, 3, 224, 224)).astype(np.float32)
    key = "/cnnserve-test-images"
    handle = shm.create_shared_memory_region("images", key, x.nbytes)
    try:
        shm.set_shared_memory_region(handle, [x])
        client.register_system_shared_memory("images", key, x.nbytes)
        tensor = triton.InferInput("images", list(x.shape), "FP32")
        tensor.set_shared_memory("images", x.nbytes)  # the request carries no tensor bytes
        means = client.infer("images", [tensor]).as_numpy("means")
        np.testing.assert_allclose(means, direct(plain_repo, "images", {"images": x})[0],
                                   rtol=1e-5)
    finally:
        client.unregister_system_shared_memory("images")
        shm.destroy_shared_memory_region(handle)
