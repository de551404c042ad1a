"""The probe port: its own process, answering from what the server publishes."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service.observability.probes import LIVENESS, ProbeView, Readiness, Shared
from tests.servers import ServerProcess
from tests.service.oip import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _view(readiness: Readiness, stall_s: float = 10.0) -> ProbeView:
    shared = Shared()
    shared.write(readiness)
    return ProbeView(shared, stall_s)


READY = Readiness(ready=True, services=frozenset({"", "lenet"}),
                  known=frozenset({"", "lenet", "alexnet"}),
                  models=frozenset({("lenet", "3")}))


def test_readiness_follows_what_the_server_published() -> None:
    view = _view(READY)
    assert view.health("") == SERVING and view.health("lenet") == SERVING
    assert view.health("alexnet") == NOT_SERVING  # known, not ready
    assert view.health("resnet") is None  # NOT_FOUND, as on the serving port
    assert view.model_ready("lenet", "") and view.model_ready("lenet", "3")
    assert not view.model_ready("lenet", "2") and not view.model_ready("alexnet", "")
    assert view.ready and view.live


def test_a_draining_server_is_unready_but_alive() -> None:
    view = _view(Readiness(draining=True, known=READY.known))
    assert view.health("") == NOT_SERVING and view.health("lenet") == NOT_SERVING
    assert view.health(LIVENESS) == SERVING
    assert not view.ready and not view.model_ready("lenet", "")


def test_a_loop_that_stopped_beating_is_dead_and_unready() -> None:
    view = _view(READY, stall_s=0.05)
    view.shared.beat.value = time.monotonic() - 1
    assert view.health(LIVENESS) == NOT_SERVING and view.health("") == NOT_SERVING
    assert not view.live and not view.ready
    view.shared.beat.value = time.monotonic()
    assert view.health(LIVENESS) == SERVING and view.health("") == SERVING


def test_a_snapshot_too_large_for_shared_memory_keeps_the_server_state() -> None:
    many = frozenset(f"model-{i:05d}-{'x' * 40}" for i in range(2000))
    view = _view(Readiness(ready=True, services=many | {""}, known=many | {""}))
    assert view.health("") == SERVING  # the names are dropped, not the verdict


def _probe_stubs(server: ServerProcess) -> tuple[health_pb2_grpc.HealthStub,
                                                  service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.probe_port}")
    return (health_pb2_grpc.HealthStub(channel),
            service_pb2_grpc.GRPCInferenceServiceStub(channel))


def _check(stub: health_pb2_grpc.HealthStub, service: str = "") -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_the_probe_port_answers_health_and_the_oip_probes(server: ServerProcess) -> None:
    health, oip = _probe_stubs(server)
    for service in ("", LIVENESS, "inference.GRPCInferenceService", "cnnserve.v1.Classifier",
                    "lenet", "alexnet", "vgg11_bn"):
        assert _check(health, service) == SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        _check(health, "resnet")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert oip.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live
    assert oip.ServerReady(service_pb2.ServerReadyRequest(), timeout=5).ready
    assert oip.ModelReady(service_pb2.ModelReadyRequest(name="lenet"), timeout=5).ready
    assert not oip.ModelReady(service_pb2.ModelReadyRequest(name="lenet", version="9"),
                              timeout=5).ready
    with pytest.raises(grpc.RpcError) as err:  # no work is ever done on the probe port
        oip.ModelInfer(service_pb2.ModelInferRequest(model_name="lenet"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as err:
        next(health.Watch(health_pb2.HealthCheckRequest(), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The serving port knows the liveness name too.
    serving = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    assert _check(serving, LIVENESS) == SERVING


def test_held_connections_do_not_crowd_out_the_probes(server: ServerProcess) -> None:
    held = [socket.create_connection(("127.0.0.1", server.probe_port), timeout=5)
            for _ in range(300)]  # no handshake, ever
    try:
        health, _ = _probe_stubs(server)
        assert _check(health) == SERVING
    finally:
        for sock in held:
            sock.close()


def _probe_process(server: ServerProcess) -> psutil.Process:
    (child,) = [c for c in psutil.Process(server.proc.pid).children()
                if "multiprocessing.spawn" in " ".join(c.cmdline())]
    return child


def test_a_frozen_server_is_reported_dead_and_a_thawed_one_alive(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, env={"CNNSERVE_LOOP_STALL_S": "1"})
    health, oip = _probe_stubs(server)
    assert _check(health, LIVENESS) == SERVING
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: _check(health, LIVENESS) == NOT_SERVING, timeout=10)
        assert _check(health) == NOT_SERVING
        assert not oip.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    wait_until(lambda: _check(health, LIVENESS) == SERVING and _check(health) == SERVING,
               timeout=10)


def test_the_probe_process_ends_with_its_server(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    stopped = server_factory(served_repo)
    probes = _probe_process(stopped)
    assert stopped.terminate() == 0
    probes.wait(5)  # raises if it outlives the server

    killed = server_factory(served_repo)
    probes = _probe_process(killed)
    killed.proc.kill()
    probes.wait(5)
