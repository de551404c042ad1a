"""The probe listener: liveness and readiness in a process of their own.

On the serving port a probe waits behind every call that arrived before it (the event
loop serves calls in arrival order), and a thread of the serving process waits for the
GIL, which a full garbage collection holds for ~100 ms once a few thousand calls are in
flight. Either way a flood of headers or of unread answers delays probes past any sane
timeout, and Kubernetes would restart a pod that is only busy. So a small process, which
runs no request work, answers the probes on a port of its own from what the server last
published in shared memory: its readiness, and a heartbeat its event loop writes every
`BEAT_S`. A loop that has not beaten for `stall_s` (a deadlock, a handler that never
yields) is reported dead, so the orchestrator restarts it; the probe process exits when
its server does. Plaintext and without tokens, like the Kubernetes probes that call it;
it reveals readiness only.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    import grpc
    from google.protobuf.message import Message


LIVENESS = "liveness"
"""The health service name that asks for liveness rather than readiness."""
BEAT_S = 0.5
START_TIMEOUT_S = 60.0
_SNAPSHOT_BYTES = 1 << 16
_THREADS = 2
_MAX_CALLS = 32
"""Probe calls in progress at once; past it RESOURCE_EXHAUSTED (probes take microseconds)."""
# Kubelet opens a connection per probe and finishes its handshake in milliseconds, so
# connections that idle or stall are dropped fast and the cap is high: a client holding
# many open must keep renewing thousands a second to crowd the probes out.
_OPTIONS = [("grpc.max_receive_message_length", 4096),
            ("grpc.max_concurrent_streams", 8),
            ("grpc.max_allowed_incoming_connections", 4096),
            ("grpc.server_handshake_timeout_ms", 2000),
            ("grpc.max_connection_idle_ms", 5000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.compression_enabled_algorithms_bitset", 0b001)]


@dataclass(frozen=True)
class Readiness:
    """What the server last published."""

    ready: bool = False
    draining: bool = False
    services: frozenset[str] = frozenset()
    """Health service names that are SERVING (the server's, its APIs', ready models')."""
    known: frozenset[str] = frozenset()
    """Every service name the serving port's health service knows."""
    models: frozenset[tuple[str, str]] = frozenset()
    """(name, version) of every ready model."""

    def encode(self) -> bytes:
        return json.dumps([self.ready, self.draining, sorted(self.services),
                           sorted(self.known), sorted(self.models)]).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Readiness:
        ready, draining, services, known, models = json.loads(raw)
        return cls(ready, draining, frozenset(services), frozenset(known),
                   frozenset((n, v) for n, v in models))


class Shared:
    """Shared memory between the server (the only writer) and its probe process: a
    heartbeat and a readiness snapshot behind a sequence number, so neither side ever
    waits for the other (a reader retries a snapshot it saw half-written)."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        # Raw shared ctypes (no lock): one writer, readers that retry.
        self.beat: Any = ctx.Value(ctypes.c_double, time.monotonic(), lock=False)
        self.seq: Any = ctx.Value(ctypes.c_uint64, 0, lock=False)
        self.size: Any = ctx.Value(ctypes.c_uint32, 0, lock=False)
        self.data: Any = ctx.Array(ctypes.c_char, _SNAPSHOT_BYTES, lock=False)

    def write(self, readiness: Readiness) -> None:
        raw = readiness.encode()
        if len(raw) > _SNAPSHOT_BYTES:  # thousands of models: name them no more
            raw = Readiness(readiness.ready, readiness.draining).encode()
        self.seq.value += 1
        self.data[:len(raw)] = raw
        self.size.value = len(raw)
        self.seq.value += 1

    def read(self) -> Readiness:
        while True:
            seq = self.seq.value
            if seq % 2 == 0:
                raw = self.data[:self.size.value]
                if self.seq.value == seq:
                    return Readiness.decode(raw) if raw else Readiness()
            time.sleep(0.0005)


class ProbeState:
    """The server's side: publishes readiness and beats while its loop turns."""

    def __init__(self, shared: Shared | None = None) -> None:
        self.shared = shared or Shared()
        self.readiness = Readiness()

    def publish(self, ready: bool, ready_models: Iterable[tuple[str, str]],
                known_models: Iterable[str], server_services: Iterable[str]) -> None:
        """`ready`: every model is; `ready_models`: (name, version) of each ready one."""
        served = frozenset(ready_models)
        services = set(server_services) if ready else set()
        self.readiness = Readiness(
            ready=ready, draining=self.readiness.draining,
            services=frozenset(services | {name for name, _ in served}),
            known=frozenset({*server_services, *known_models}),
            models=served)
        self.shared.write(self.readiness)

    def drain(self) -> None:
        self.readiness = Readiness(False, True, known=self.readiness.known)
        self.shared.write(self.readiness)

    async def beat(self) -> None:
        while True:
            self.shared.beat.value = time.monotonic()  # CLOCK_MONOTONIC: system-wide
            await asyncio.sleep(BEAT_S)


class ProbeView:
    """The probe process's side: what to answer, from the shared memory."""

    def __init__(self, shared: Shared, stall_s: float) -> None:
        self.shared = shared
        self.stall_s = stall_s

    @property
    def live(self) -> bool:
        return time.monotonic() - self.shared.beat.value < self.stall_s

    @property
    def ready(self) -> bool:
        readiness = self.shared.read()
        return self.live and readiness.ready and not readiness.draining

    def health(self, service: str) -> int | None:
        """The health status of `service` (a HealthCheckResponse.ServingStatus), or None
        for a name the server does not know."""
        from grpc_health.v1.health_pb2 import HealthCheckResponse

        serving, not_serving = HealthCheckResponse.SERVING, HealthCheckResponse.NOT_SERVING
        if service == LIVENESS:
            return serving if self.live else not_serving
        readiness = self.shared.read()
        if service != "" and service not in readiness.known:
            return None
        if not self.live or readiness.draining:
            return not_serving
        if service == "":
            return serving if readiness.ready else not_serving
        return serving if service in readiness.services else not_serving

    def model_ready(self, name: str, version: str) -> bool:
        readiness = self.shared.read()
        return (self.live and not readiness.draining
                and any(n == name and version in ("", v) for n, v in readiness.models))


def _handlers(view: ProbeView) -> list[grpc.GenericRpcHandler]:
    import grpc
    from grpc_health.v1 import health_pb2

    from protos import grpc_service_pb2 as pb

    def check(request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
              ) -> health_pb2.HealthCheckResponse:
        status = view.health(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"unknown service {request.service[:100]!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def watch(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "the probe port answers Check; Watch on the serving port")

    def unary(behaviour: Callable[..., Any], request: type[Message], response: type[Message]
              ) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=request.FromString,
            response_serializer=response.SerializeToString)

    return [
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": unary(check, health_pb2.HealthCheckRequest,
                           health_pb2.HealthCheckResponse),
            "Watch": grpc.unary_stream_rpc_method_handler(
                watch, request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString)}),
        grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
            "ServerLive": unary(lambda r, c: pb.ServerLiveResponse(live=view.live),
                                pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(lambda r, c: pb.ServerReadyResponse(ready=view.ready),
                                 pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(
                lambda r, c: pb.ModelReadyResponse(ready=view.model_ready(r.name, r.version)),
                pb.ModelReadyRequest, pb.ModelReadyResponse)}),
    ]


def _probe_process(shared: Shared, stall_s: float, address: str, reuse_port: bool,
                   report: Connection) -> None:
    """The probe process's body: serve until the server process is gone."""
    import signal

    import grpc

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle

    server = grpc.server(ThreadPoolExecutor(_THREADS, thread_name_prefix="probe"),
                         handlers=_handlers(ProbeView(shared, stall_s)),
                         maximum_concurrent_rpcs=_MAX_CALLS,
                         options=[*_OPTIONS, ("grpc.so_reuseport", int(reuse_port))])
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # gRPC's way of saying the port is taken
        port = 0
    if port == 0:
        report.send(f"could not bind the probe port {address}")
        return
    server.start()
    report.send(port)
    report.close()
    parent = os.getppid()
    while os.getppid() == parent:  # re-parented: the server died without stopping us
        time.sleep(BEAT_S)
    server.stop(0)


class ProbeServer:
    """The probe process, seen from the server."""

    def __init__(self, process: mp.process.BaseProcess, port: int) -> None:
        self.process = process
        self.port = port

    @classmethod
    def start(cls, shared: Shared, stall_s: float, host: str, port: int, reuse_port: bool
              ) -> ProbeServer:
        ctx = mp.get_context("spawn")
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_probe_process, name="cnnserve-probes", daemon=True,
                              args=(shared, stall_s, f"{host}:{port}", reuse_port, send))
        process.start()
        send.close()
        if not receive.poll(START_TIMEOUT_S):
            process.kill()
            raise OSError(f"the probe process did not start within {START_TIMEOUT_S:g}s")
        try:
            answer = receive.recv()
        except EOFError:
            answer = "the probe process exited before it listened"
        if not isinstance(answer, int):
            process.join(5)
            raise OSError(answer)
        return cls(process, answer)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
