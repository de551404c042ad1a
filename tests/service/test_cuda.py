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
from service.engine.runtime import cuda_available
from tests.servers import ServerProcess

pytestmark = pytest.mark.skipif(not cuda_available(),
                                reason="needs a CUDA GPU and onnxruntime-gpu's CUDA provider")


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
