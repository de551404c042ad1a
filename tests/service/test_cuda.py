"""The CUDA path: CUDA execution provider, IOBinding and FP16 models (needs a GPU)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc as pb_grpc
from service.engine.runtime import cuda_unusable_reason
from tests.servers import ServerProcess

UNUSABLE = cuda_unusable_reason()
pytestmark = pytest.mark.skipif(bool(UNUSABLE), reason=f"needs CUDA, and {UNUSABLE}")


def classify(server: ServerProcess, model: str, x: np.ndarray) -> np.ndarray:
    stub = pb_grpc.ClassifierStub(grpc.insecure_channel(server.address))
    response = stub.Predict(pb.PredictRequest(model=model, top_k=10, images=[
        pb.Image(tensor=pb.Tensor(shape=list(x.shape[1:]), data=row.ravel().tolist()))
        for row in x]), timeout=60)
    return np.array([[p.probability for p in sorted(c.predictions, key=lambda p: p.index)]
                     for c in response.classifications])


def cpu_probabilities(repo: Path, model: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x})[0].astype(np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("fp16", 2e-2)])
def test_cuda_serving_matches_the_cpu(served_repo: Path, precision: str, atol: float,
                                      server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--device", "cuda", "--precision", precision)
    stub = pb_grpc.ClassifierStub(grpc.insecure_channel(server.address))
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert {m.provider for m in models.values()} == {"CUDAExecutionProvider"}
    for name, shape in {"lenet": (1, 28, 28), "alexnet": (1, 64, 64),
                        "vgg11_bn": (1, 32, 32)}.items():
        x = np.random.default_rng(0).standard_normal((7, *shape)).astype(np.float32)
        np.testing.assert_allclose(classify(server, name, x),
                                   cpu_probabilities(served_repo, name, x), atol=atol)


def test_tensors_travel_through_cuda_shared_memory(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """A client process allocates GPU memory and shares it by CUDA IPC handle, as
    tritonclient.utils.cuda_shared_memory does (here with the CUDA runtime through ctypes)."""
    import base64
    import ctypes

    import tritonclient.grpc as triton

    from service.memory.cuda import _IpcHandle, _load_cudart

    cudart = _load_cudart()
    assert cudart is not None
    cudart.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
    cudart.cudaFree.argtypes = [ctypes.c_void_p]
    cudart.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]
    x = np.random.default_rng(9).standard_normal((2, 1, 28, 28)).astype(np.float32)
    logits = np.empty((2, 10), np.float32)
    assert cudart.cudaSetDevice(0) == 0
    buffers = {"in": ctypes.c_void_p(), "out": ctypes.c_void_p()}
    handles = {}
    for name, size in (("in", x.nbytes), ("out", logits.nbytes)):
        assert cudart.cudaMalloc(ctypes.byref(buffers[name]), size) == 0
        handle = _IpcHandle()
        assert cudart.cudaIpcGetMemHandle(ctypes.byref(handle), buffers[name]) == 0
        handles[name] = base64.b64encode(bytes(handle))
    assert cudart.cudaMemcpy(buffers["in"], x.ctypes.data, x.nbytes, 1) == 0  # to the GPU
    server = server_factory(served_repo, "--device", "cuda")
    client = triton.InferenceServerClient(server.address)
    try:
        client.register_cuda_shared_memory("in", handles["in"], 0, x.nbytes)
        client.register_cuda_shared_memory("out", handles["out"], 0, logits.nbytes)
        assert set(client.get_cuda_shared_memory_status().regions) == {"in", "out"}
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_shared_memory("in", x.nbytes)
        wanted = triton.InferRequestedOutput("logits")
        wanted.set_shared_memory("out", logits.nbytes)
        client.infer("lenet", [tensor], outputs=[wanted])
        assert cudart.cudaMemcpy(logits.ctypes.data, buffers["out"], logits.nbytes, 2) == 0
        session = ort.InferenceSession(str(served_repo / "lenet" / "1" / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(logits, session.run(None, {"input": x})[0], atol=1e-4)
    finally:
        client.unregister_cuda_shared_memory()
        for pointer in buffers.values():
            cudart.cudaFree(pointer)
    assert server.terminate() == 0
