"""Open Inference Protocol helpers for tests, on tritonclient's generated messages."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.servers import ServerProcess


def request(x: np.ndarray, model: str = "lenet") -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(
        model_name=model, inputs=[service_pb2.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.astype("<f4").tobytes()])


def logits(response: service_pb2.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(
        tuple(response.outputs[0].shape))


def metric(text: str, name: str, model: str = "lenet") -> float:
    """The sum of `name`'s series for `model` (over versions, APIs, codes; no buckets)."""
    found = [float(value) for labels, value in
             re.findall(rf'^{name}\{{([^}}]*)\}} (\S+)$', text, re.M)
             if f'model="{model}"' in labels.split(",") and 'le="' not in labels]
    assert found, f"{name} for {model} not in metrics"
    return sum(found)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll a condition on the server, bounded in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def stub_for(server: ServerProcess) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
