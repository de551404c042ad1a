"""Overload, shutdown under load, and a hard kill: the server degrades deliberately."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.servers import ServerProcess, free_port
from tests.service.oip import logits, request, stub_for, wait_until

X = np.random.default_rng(7).standard_normal((1, 1, 28, 28)).astype(np.float32)


def peak_rss_mib(server: ServerProcess) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines()
               if line.startswith("VmHWM:"))
    return kib / 1024


def test_overload_is_refused_fast_while_accepted_requests_are_answered(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    # Capacity: 6 queued requests (no preferred batch size), run together once the oldest
    # has waited 0.5 s.
    server = server_factory(served_repo, "--max-queue-size", "6", "--batching", "delay",
                            "--max-queue-delay-us", "500000")
    stub = stub_for(server)
    stub.ModelInfer(request(X), timeout=30)
    rss_before = peak_rss_mib(server)
    outcomes: list[tuple[grpc.StatusCode, float]] = []
    lock = threading.Lock()

    def record(started: float) -> Callable[[Future[service_pb2.ModelInferResponse]], None]:
        def done(future: Future[service_pb2.ModelInferResponse]) -> None:
            exc = future.exception()
            code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.OK
            with lock:
                outcomes.append((code, time.monotonic() - started))
        return done

    futures = []
    for _ in range(3):  # three waves, each far beyond what the queue holds
        for _ in range(150):
            started = time.monotonic()  # before the send: the server may enqueue at once
            future = stub.ModelInfer.future(request(X), timeout=60)
            future.add_done_callback(record(started))
            futures.append(future)
        for future in futures:
            future.exception(timeout=60)
    codes = [code for code, _ in outcomes]
    assert len(codes) == 450
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
    accepted = [t for code, t in outcomes if code == grpc.StatusCode.OK]
    refused = [t for code, t in outcomes if code != grpc.StatusCode.OK]
    assert len(accepted) >= 3 * 6
    # Accepted requests wait for their batch (0.5 s by construction); refusals do not.
    assert min(accepted) >= 0.5
    assert statistics.median(refused) < 0.5 * min(accepted)
    # Accepted requests never wait behind the excess: one batch delay, not a backlog.
    assert max(accepted) < 10 * 0.5
    # The excess is not buffered anywhere: peak memory hardly moves.
    assert peak_rss_mib(server) - rss_before < 100
    assert logits(stub.ModelInfer(request(X), timeout=30)).shape == (1, 10)


def test_sigterm_under_load_answers_every_accepted_request_and_exits_in_grace(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--max-queue-delay-us", "5000",
                            env={"CNNSERVE_GRACE_PERIOD_S": "5"})
    codes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def load() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(2000):  # bounded; ends early once the server is gone
                try:
                    stub.ModelInfer(request(X), timeout=30)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    if exc.code() == grpc.StatusCode.UNAVAILABLE and stop.is_set():
                        return

    with ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(load) for _ in range(8)]
        wait_until(lambda: len(codes) >= 200, timeout=60)
        stopped_at = time.monotonic()
        server.proc.send_signal(15)
        stop.set()
        assert server.proc.wait(30) == 0
        exit_s = time.monotonic() - stopped_at
        for worker in workers:
            worker.result(timeout=60)
    assert exit_s < 5 + 5, f"exited {exit_s:.1f}s after SIGTERM; grace is 5s"
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
    assert codes.count(grpc.StatusCode.UNAVAILABLE) >= 1


def test_after_kill_9_a_restarted_server_is_ready_and_retrying_clients_succeed(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    port = free_port()
    first = server_factory(served_repo, port=port)
    channel = grpc.insecure_channel(first.address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    before = logits(stub.ModelInfer(request(X), timeout=30))
    first.proc.kill()
    assert first.proc.wait(10) == -9
    try:
        stub.ModelInfer(request(X), timeout=5)
        raise AssertionError("a killed server answered")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    # A client that retries (wait_for_ready) while the server restarts on the same port.
    with ThreadPoolExecutor(1) as pool:
        retried = pool.submit(stub.ModelInfer, request(X), timeout=120, wait_for_ready=True)
        second = server_factory(served_repo, port=port)
        np.testing.assert_array_equal(logits(retried.result(timeout=120)), before)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    assert second.terminate() == 0
