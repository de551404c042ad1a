"""ModelStreamInfer under load and when its client leaves: requests pipelined on one stream
batch together and keep their ids; a stream cut off mid-flight leaves nothing held."""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.servers import ServerProcess
from tests.service.frontends.test_grpc_inference import direct
from tests.service.oip import metric, wait_until

X = np.random.default_rng(11).standard_normal((64, 1, 64, 64)).astype(np.float32)


def requests(n: int, model: str = "alexnet") -> list[service_pb2.ModelInferRequest]:
    return [service_pb2.ModelInferRequest(
        model_name=model, id=f"r{i}", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[1, 1, 64, 64])],
        raw_input_contents=[X[i % len(X)][None].tobytes()]) for i in range(n)]


def executions(server: ServerProcess, model: str = "alexnet") -> int:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
    stats = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=model), timeout=10)
    return int(stats.model_stats[0].execution_count)


def stream_counts(text: str) -> dict[str, float]:
    """cnnserve_requests_total for the stream's requests, by code."""
    return {code: float(value) for code, value in re.findall(
        r'^cnnserve_requests_total\{api="oip_stream",code="(\w+)",model="alexnet"\} (\S+)$',
        text, re.M)}


def test_requests_pipelined_on_one_stream_batch_together_and_keep_their_ids(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """A client that sends its requests without waiting for answers gets each back with
    its id and the right logits, and the model ran them in batches, not one by one.
    Triton's rule with a long delay makes the batches whatever the host's speed: under
    the budget rule a model that keeps up with the stream rightly runs each at once."""
    server = server_factory(served_repo, "--instances", "1", "--batching", "delay",
                            "--max-queue-delay-us", "2000000", "--max-batch-size", "8")
    before = executions(server)
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter(requests(64)), timeout=60))
    assert [a.error_message for a in answers] == [""] * 64
    by_id = {a.infer_response.id: a.infer_response for a in answers}
    assert set(by_id) == {f"r{i}" for i in range(64)}
    expected = direct(served_repo, "alexnet", X)
    for i in range(64):
        logits = np.frombuffer(by_id[f"r{i}"].raw_output_contents[0], "<f4")
        np.testing.assert_allclose(logits, expected[i], rtol=1e-4, atol=1e-4)
    ran = executions(server) - before
    assert ran < 64, f"{ran} batches for 64 pipelined requests: none formed"
    assert server.terminate() == 0


def test_a_stream_cut_off_mid_flight_leaves_nothing_held(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """The client sends 200 requests and cancels after two answers: every request the
    server read is counted once (answered or cancelled), and no call, byte or queued
    request is left behind; the server goes on serving."""
    server = server_factory(served_repo, "--instances", "1")
    outbox: queue.Queue[service_pb2.ModelInferRequest | None] = queue.Queue()
    for request in requests(200):
        outbox.put(request)
    channel = grpc.insecure_channel(server.address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    call = stub.ModelStreamInfer(iter(outbox.get, None), timeout=60)
    got: list[object] = []

    def read() -> None:
        try:
            for answer in call:
                got.append(answer)
                if len(got) == 2:
                    call.cancel()
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(60)
    assert not reader.is_alive() and len(got) >= 2

    def settled() -> bool:
        text = server.metrics()
        return (_gauge(text, "cnnserve_in_flight_calls", 'api="oip_stream"') == 0
                and _gauge(text, "cnnserve_memory_held_bytes") == 0
                and metric(text, "cnnserve_queue_depth", "alexnet") == 0)

    wait_until(settled)
    counted = stream_counts(server.metrics())
    assert set(counted) <= {"OK", "CANCELLED"}, counted
    assert 2 <= sum(counted.values()) <= 200, counted
    channel.close()
    with grpc.insecure_channel(server.address) as again:
        answers = list(service_pb2_grpc.GRPCInferenceServiceStub(again).ModelStreamInfer(
            iter(requests(3)), timeout=30))
    assert [a.error_message for a in answers] == [""] * 3
    assert server.terminate() == 0


def _gauge(text: str, name: str, labels: str = "") -> float:
    found = re.findall(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M)
    return sum(float(value) for got, value in found if labels in got)


def test_bytes_that_are_not_a_request_end_the_stream_invalid_argument(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """A stream whose second message is not protobuf gets its first answer, then
    INVALID_ARGUMENT naming the cause, counted as such; the server serves on."""
    server = server_factory(served_repo)
    good = requests(1)[0].SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                    request_serializer=None, response_deserializer=None)
        outbox: queue.Queue[bytes | None] = queue.Queue()
        outbox.put(good)
        call = raw(iter(outbox.get, None), timeout=30)
        answers: list[bytes] = []
        try:
            for answer in call:
                answers.append(answer)
                outbox.put(b"\xff\xff\xff\xff not protobuf")  # once the first is answered
        except grpc.RpcError:
            pass
        outbox.put(None)
        assert call.code() == grpc.StatusCode.INVALID_ARGUMENT, call.details()
        assert "not valid protobuf" in (call.details() or "")
        assert len(answers) == 1
        assert not service_pb2.ModelStreamInferResponse.FromString(answers[0]).error_message
    wait_until(lambda: re.search(r'^cnnserve_requests_total\{api="stream",'
                                 r'code="INVALID_ARGUMENT",model="unknown"\} 1\.0$',
                                 server.metrics(), re.M) is not None)
    with grpc.insecure_channel(server.address) as again:
        answered = list(service_pb2_grpc.GRPCInferenceServiceStub(again).ModelStreamInfer(
            iter(requests(2)), timeout=30))
    assert [a.error_message for a in answered] == [""] * 2
    assert server.terminate() == 0
