"""Request limits: images per request, message size, default deadline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import classifier_pb2 as cpb
from protos import classifier_pb2_grpc as cpb_grpc
from tests.servers import ServerProcess
from tests.service.oip import logits, request, stub_for


def test_limits_refuse_oversized_requests_and_keep_serving(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--max-images-per-request", "2",
                            "--max-queue-delay-us", "0",
                            env={"CNNSERVE_MAX_MESSAGE_BYTES": str(1 << 20)})
    stub = stub_for(server)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request(np.zeros((3, 1, 28, 28), np.float32)), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 2 images per request" in err.value.details()
    assert "got 3" in err.value.details()
    classifier = cpb_grpc.ClassifierStub(grpc.insecure_channel(server.address))
    with pytest.raises(grpc.RpcError) as err:  # refused before any image is decoded
        classifier.Predict(cpb.PredictRequest(model="lenet", images=[
            cpb.Image(encoded=b"not decoded")] * 3), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 2 images per request" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # over max_message_bytes (1 MiB)
        classifier.Predict(cpb.PredictRequest(model="lenet", images=[
            cpb.Image(encoded=bytes(2 << 20))]), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert logits(stub.ModelInfer(request(np.zeros((2, 1, 28, 28), np.float32)),
                                  timeout=10)).shape == (2, 10)


def test_the_server_caps_every_deadline_at_its_request_timeout(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    # Batches wait 3 s for company; the server gives every call at most 0.3 s, and says so
    # itself (the client would give up only after 2 s).
    server = server_factory(served_repo, "--request-timeout-s", "0.3", "--batching", "delay",
                            "--max-queue-delay-us", "3000000")
    with pytest.raises(grpc.RpcError) as err:
        stub_for(server).ModelInfer(request(np.zeros((1, 1, 28, 28), np.float32)), timeout=2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "before compute" in err.value.details()
