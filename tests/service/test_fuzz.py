"""Fuzzing both APIs of a real server: every answer is a deliberate gRPC status.

Random shapes, datatypes, byte lengths, NaN/inf, huge and negative dimensions, empty
tensors, random bytes as images, unicode and path-like model names. No example may
produce UNKNOWN or INTERNAL (an unhandled error), and the server must still serve
good requests afterwards.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc

from protos import classifier_pb2 as cpb
from protos import classifier_pb2_grpc as cpb_grpc
from tests.servers import ServerProcess, start_server
from tests.service.oip import logits, request

# What a well-behaved server may answer to arbitrary input.
DELIBERATE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

names = st.one_of(
    st.sampled_from(["lenet", "alexnet", "vgg11_bn", "", "../lenet", "lenet/1", "/etc/passwd",
                     "..", "LENET", "lenet\x00", "con", "model.onnx"]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40))
dims = st.one_of(st.integers(-3, 70), st.sampled_from([0, 2**31, 2**62, -(2**63), 2**63 - 1]))
special = st.sampled_from([0.0, float("nan"), float("inf"), float("-inf"), 3.4e38, -1e-45])


@st.composite
def infer_requests(draw: st.DrawFn) -> service_pb2.ModelInferRequest:
    shape = draw(st.one_of(st.just([draw(st.integers(1, 4)), 1, 28, 28]),
                           st.lists(dims, max_size=5)))
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name=draw(st.sampled_from(["input", "logits", "", "INPUT", "x"])),
        datatype=draw(st.sampled_from(["FP32", "FP16", "INT8", "BYTES", "", "fp32", "ÄÖÜ"])),
        shape=shape)
    req = service_pb2.ModelInferRequest(
        model_name=draw(names), model_version=draw(st.sampled_from(["", "1", "2", "-1", "x"])),
        inputs=[tensor] * draw(st.integers(0, 2)))
    kind = draw(st.sampled_from(["exact", "random", "typed", "both", "none"]))
    count = int(np.prod(shape)) if shape and all(0 <= d <= 64 for d in shape) else 4
    if kind in ("exact", "both"):
        values = draw(st.lists(special, min_size=count, max_size=count)) if count <= 64 \
            else [float("nan")] * count
        req.raw_input_contents.append(struct.pack(f"<{count}f", *values))
    if kind == "random":
        for _ in range(draw(st.integers(1, 3))):
            req.raw_input_contents.append(draw(st.binary(max_size=4 * 28 * 28 + 8)))
    if kind in ("typed", "both") and req.inputs:
        req.inputs[0].contents.fp32_contents.extend(
            draw(st.lists(special, max_size=min(count, 64))) if count > 64
            else draw(st.lists(special, min_size=count, max_size=count)))
        if draw(st.booleans()):
            req.inputs[0].contents.int_contents.append(1)
    if draw(st.booleans()):
        req.outputs.append(service_pb2.ModelInferRequest.InferRequestedOutputTensor(
            name=draw(st.sampled_from(["logits", "probs", ""]))))
    return req


def _png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def images(draw: st.DrawFn) -> cpb.Image:
    kind = draw(st.sampled_from(["random", "truncated", "png", "tensor", "empty"]))
    if kind == "random":
        return cpb.Image(encoded=draw(st.binary(min_size=1, max_size=2048)))
    if kind == "truncated":
        good = _png(draw(st.integers(1, 64)))
        return cpb.Image(encoded=good[:draw(st.integers(1, len(good) - 1))])
    if kind == "png":
        return cpb.Image(encoded=_png(draw(st.integers(1, 300))))
    if kind == "tensor":
        shape = draw(st.one_of(st.just([1, 28, 28]), st.lists(dims, max_size=4)))
        return cpb.Image(tensor=cpb.Tensor(shape=shape, data=draw(st.lists(special,
                                                                           max_size=800))))
    return cpb.Image()


@st.composite
def predict_requests(draw: st.DrawFn) -> cpb.PredictRequest:
    return cpb.PredictRequest(model=draw(names), version=draw(st.sampled_from(["", "1", "9"])),
                              images=draw(st.lists(images(), max_size=4)),
                              top_k=draw(st.integers(0, 2**32 - 1)))


@pytest.fixture(scope="module")
def fuzzed_server(served_repo: Path) -> Iterator[ServerProcess]:
    server = start_server(served_repo, "--max-queue-delay-us", "0")
    yield server
    assert server.terminate() == 0, "".join(server.lines)


def fuzz(strategy: st.SearchStrategy[Any], rpc: Callable[..., Any]) -> None:
    """Send every example `strategy` draws through `rpc`; each must end deliberately."""
    @FUZZ
    @given(strategy)
    def check(request: Any) -> None:
        try:
            rpc(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in DELIBERATE, (exc.code(), request)

    check()


def serves_correctly_still(server: ServerProcess) -> None:
    """Nothing the fuzzing sent broke the server: alive, deterministic, no server faults."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    first = logits(stub.ModelInfer(request(x), timeout=30))
    assert first.shape == (3, 10) and np.isfinite(first).all()
    np.testing.assert_array_equal(logits(stub.ModelInfer(request(x), timeout=30)), first)
    assert not re.search(r'code="(INTERNAL|UNKNOWN)"\} [1-9]', server.metrics())
    assert server.proc.poll() is None


def test_fuzzed_inference_requests_get_deliberate_statuses(fuzzed_server: ServerProcess) -> None:
    channel = grpc.insecure_channel(fuzzed_server.address)
    fuzz(infer_requests(), service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer)
    serves_correctly_still(fuzzed_server)


def test_fuzzed_classifier_requests_get_deliberate_statuses(
        fuzzed_server: ServerProcess) -> None:
    channel = grpc.insecure_channel(fuzzed_server.address)
    fuzz(predict_requests(), cpb_grpc.ClassifierStub(channel).Predict)
    serves_correctly_still(fuzzed_server)
