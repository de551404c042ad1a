"""The asyncio gRPC server: both APIs, health, reflection, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from contract.repository import RepositoryError
from protos import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from service.app.ready import ready_line
from service.app.settings import ServiceSettings
from service.core.admission import Admission, AdmissionLimits
from service.core.classify import Classifier, DecodeLimits
from service.core.inference import InferenceCore, RequestLimits
from service.core.oip import OpenInference
from service.edge.grpc_edge import EdgeInterceptor
from service.edge.http_edge import HttpEdge
from service.edge.security import (
    BearerTokens,
    TokenAuthInterceptor,
    load_tokens,
    server_credentials,
    ssl_context,
    warn_if_exposed,
)
from service.engine.models import ModelSet, load_models
from service.engine.reload import ModelControl
from service.engine.runtime import DeviceError, place
from service.frontends.grpc_classifier import ClassifierServicer
from service.frontends.grpc_inference import InferenceServicer
from service.frontends.http_inference import InferenceRoutes
from service.memory.cuda import CudaSharedMemoryRegistry
from service.memory.regions import Regions
from service.memory.system import SharedMemoryRegistry
from service.observability.connections import count_connections
from service.observability.gpu_metrics import register_gpu_metrics
from service.observability.metrics import Metrics
from service.observability.metrics_http import MetricsServer
from service.observability.probes import LIVENESS, ProbeServer, ProbeState
from service.status import bounded

log = logging.getLogger(__name__)
OIP_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
DRAIN_QUIET_S = 0.2
"""At shutdown, gRPC stops once no API call has arrived for this long (or grace ends)."""
CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
SERVER_SERVICES = ("", OIP_SERVICE, CLASSIFIER_SERVICE)
"""Health service names that stand for the whole server: SERVING once every model is."""
LANES = frozenset({
    f"/{OIP_SERVICE}/ModelInfer", f"/{OIP_SERVICE}/ModelStreamInfer",
    f"/{OIP_SERVICE}/ServerLive", f"/{OIP_SERVICE}/ServerReady", f"/{OIP_SERVICE}/ModelReady",
    f"/{CLASSIFIER_SERVICE}/Predict", f"/{health.SERVICE_NAME}/Check",
    f"/{health.SERVICE_NAME}/Watch"})
"""Methods that gRPC accepts in a lane of their own (registered methods): inference and
health, so a flood of one (Watch streams, headers that never send a body) leaves the others
accepted at their own pace. Every other method shares the generic lane."""


class Lanes:
    """Where the generated `add_*_to_server` functions register a service: the methods in
    `lanes` become registered methods, the rest are served by the service's generic
    handler only. grpc.aio's server waits on one future per registered method each time
    it accepts a call, so each method registered costs every call of every method about
    seven Python calls."""

    def __init__(self, server: grpc.aio.Server, lanes: frozenset[str] = LANES) -> None:
        self._server = server
        self._lanes = lanes

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        own = {name: handler for name, handler in handlers.items()
               if f"/{service}/{name}" in self._lanes}
        if own:
            self._server.add_registered_method_handlers(service, own)


class Announcer:
    """Tells gRPC health and the probe port what is served, after start and each reload."""

    def __init__(self, models: ModelSet, health: health.aio.HealthServicer,
                 probes: ProbeState) -> None:
        self.models, self.health, self.probes = models, health, probes
        self._announced: set[str] = set()

    async def announce(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        overall = serving if self.models.all_ready else not_serving
        await self.health.set(LIVENESS, serving)
        for name in SERVER_SERVICES:
            await self.health.set(name, overall)
        for model in self.models:
            await self.health.set(model.name, serving if model.ready else not_serving)
        for gone in self._announced - self.models.names():
            await self.health.set(gone, not_serving)
        self._announced |= self.models.names()
        self.probes.publish(self.models.all_ready,
                            [(m.name, str(m.version)) for m in self.models if m.ready],
                            self.models.names(), SERVER_SERVICES)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    core: InferenceCore
    health: health.aio.HealthServicer
    executor: ThreadPoolExecutor
    decoder: ThreadPoolExecutor
    probes: ProbeState
    shm: Regions
    http: web.AppRunner | None = None
    """The REST port's server, when it is on."""
    http_port: int | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    """Background work (the repository watcher, the connection count), cancelled at stop."""

    @property
    def models(self) -> ModelSet:
        return self.core.models

    async def stop(self, grace_s: float) -> None:
        """Answer what was accepted, refuse the rest with UNAVAILABLE, within `grace_s`.

        The batchers close first, while the port stays open: new inference calls get a
        clear UNAVAILABLE from the handlers and queued ones are answered. gRPC stops only
        once calls have stopped arriving (DRAIN_QUIET_S) or the grace period is over:
        stopping it earlier would cancel calls it had received but not yet dispatched,
        and the client would see CANCELLED instead of a retryable UNAVAILABLE.
        """
        deadline = time.monotonic() + grace_s
        self.probes.drain()
        self.core.drain()
        for task in self.tasks:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self.models.close(), timeout=grace_s)
        except TimeoutError:
            log.warning("queued requests not finished within the %.1fs grace period", grace_s)
        while time.monotonic() < deadline and (
                self.core.in_flight
                or time.monotonic() - self.core.last_call_at < DRAIN_QUIET_S):
            await asyncio.sleep(0.01)
        if self.http is not None:  # closes idle connections; running requests have ended
            await self.http.cleanup()
        await self.server.stop(max(deadline - time.monotonic(), 0.0))
        # Calls have ended, so every decode in progress was told to stop between images.
        self.decoder.shutdown(wait=True, cancel_futures=True)
        self.executor.shutdown(wait=True)
        self.shm.close()


async def start_http(settings: ServiceSettings, oip: OpenInference,
                     classifier: Classifier, admission: Admission, metrics: Metrics,
                     reuse_port: bool) -> tuple[web.AppRunner, int, asyncio.Task[None]]:
    """The REST binding on the same event loop as gRPC; returns its runner, its port and
    the task that watches its connections."""
    tokens = BearerTokens(load_tokens(settings)) if settings.auth else None
    edge = HttpEdge(admission, tokens, settings.request_arrival_timeout_s,
                    settings.compressed_requests, settings.max_images_per_request,
                    settings.max_connections)
    app = web.Application(client_max_size=settings.max_message_bytes,
                          middlewares=[edge.middleware])
    app.add_routes(InferenceRoutes(oip, classifier, edge.read_body, edge.read_files).routes())
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           keepalive_timeout=settings.max_connection_idle_s,
                           auto_decompress=settings.compressed_requests,
                           shutdown_timeout=settings.grace_period_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.http_port,
                       ssl_context=ssl_context(settings), reuse_port=reuse_port or None)
    await site.start()
    assert runner.server is not None
    watch = asyncio.create_task(edge.watch.run(runner.server), name="http-connection-watch")
    return runner, runner.addresses[0][1], watch


def server_options(settings: ServiceSettings, reuse_port: bool) -> list[tuple[str, int]]:
    """gRPC core's transport limits: what one connection may hold and how long."""
    ms = 1000
    backlog = min(settings.max_connections * settings.max_streams_per_connection, 2**31 - 1)
    return [("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
            ("grpc.max_allowed_incoming_connections", settings.max_connections),
            ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout_s * ms)),
            ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * ms)),
            ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * ms)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms",
             int(settings.min_client_ping_interval_s * ms)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * ms)),
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * ms)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * ms)),
            # Bit 0 is identity; 1 and 2 deflate and gzip. gRPC core refuses a disabled
            # encoding (UNIMPLEMENTED) before it expands anything.
            ("grpc.compression_enabled_algorithms_bitset",
             0b111 if settings.compressed_requests else 0b001),
            # Calls gRPC core holds until Python takes them: past 1,000 it sheds them at
            # random (all past 3,000) with CANCELLED, which clients do not retry and which
            # fell on well-behaved clients during stream floods. The stream limits above
            # bound this backlog; Admission refuses from it with RESOURCE_EXHAUSTED.
            ("grpc.server.max_pending_requests", backlog),
            ("grpc.server.max_pending_requests_hard_limit", backlog),
            ("grpc.so_reuseport", int(reuse_port))]


async def start_server(settings: ServiceSettings, metrics: Metrics, reuse_port: bool = False,
                       probes: ProbeState | None = None, worker: int = 0) -> RunningServer:
    """Load and warm every model, then listen; returns once the port is bound. Worker
    `worker` of `--workers` takes its GPU by that number."""
    placement = place(settings.device, worker)
    credentials = server_credentials(settings)
    admission = Admission(AdmissionLimits(
        max_calls=settings.max_concurrent_rpcs, max_streams=settings.max_open_streams,
        memory_budget_bytes=settings.memory_budget_bytes,
        max_bytes_per_connection=settings.max_bytes_per_connection), metrics)
    edge = EdgeInterceptor(admission, settings.request_arrival_timeout_s)
    interceptors: list[grpc.aio.ServerInterceptor] = [edge]
    if settings.auth:
        interceptors.append(TokenAuthInterceptor(load_tokens(settings),
                                                 settings.auth_open_services))
    # Each model instance keeps at most one batch in flight, so threads are only made as
    # instances need them; the cap is a backstop.
    executor = ThreadPoolExecutor(max_workers=256, thread_name_prefix="onnxruntime")
    try:
        models = await asyncio.to_thread(load_models, settings, executor, metrics, placement)
    except BaseException:
        executor.shutdown()
        raise
    for model in models:
        if model.batcher is not None:
            model.batcher.start()
    # Admission is the edge's (EdgeInterceptor), not gRPC's maximum_concurrent_rpcs, which
    # would refuse probes too once other clients hold every slot.
    server = grpc.aio.server(options=server_options(settings, reuse_port),
                             interceptors=interceptors)
    decoder = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")
    core = InferenceCore(models, metrics, RequestLimits(
        settings.max_images_per_request, settings.request_timeout_s), decoder)
    shm = Regions(SharedMemoryRegistry(), CudaSharedMemoryRegistry())
    probes = probes or ProbeState()
    health_servicer = health.aio.HealthServicer()
    announcer = Announcer(models, health_servicer, probes)
    control = ModelControl(settings, models, executor, metrics, on_change=announcer.announce,
                           placement=placement)
    oip = OpenInference(core, shm, control)
    services = Lanes(server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(oip), services)
    classifier = Classifier(core, DecodeLimits(settings.max_image_pixels,
                                               settings.max_decode_cost))
    classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(classifier),
                                                         services)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, services)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(
        (OIP_SERVICE, CLASSIFIER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)),
        services)
    try:
        address = f"{settings.host}:{settings.port}"
        try:
            port = (server.add_insecure_port(address) if credentials is None
                    else server.add_secure_port(address, credentials))
        except RuntimeError:  # what grpcio raises when the port cannot be bound
            port = 0
        if port == 0:
            raise OSError(f"could not bind the gRPC port {address}: in use, or not this "
                          "host's address")
        warn_if_exposed(settings)
        await server.start()
        running = RunningServer(server, port, core, health_servicer, executor, decoder, probes,
                                shm)
        if settings.http_port is not None:
            running.http, running.http_port, watch = await start_http(
                settings, oip, classifier, admission, metrics, reuse_port)
            running.tasks.append(watch)
        await announcer.announce()
        running.tasks.append(asyncio.create_task(
            count_connections(port, metrics.connections), name="connection-count"))
        running.tasks.append(asyncio.create_task(edge.sweep(), name="arrival-sweep"))
        if settings.polls > 0:
            running.tasks.append(asyncio.create_task(control.run(), name="repository-poll"))
    except BaseException:
        # Nothing half-started outlives the failure: its gRPC server would complain at
        # exit, after the one line that says what went wrong.
        await server.stop(None)
        await models.close()
        decoder.shutdown(cancel_futures=True)
        executor.shutdown()
        raise
    return running


async def serve(settings: ServiceSettings, registry: CollectorRegistry, reuse_port: bool = False,
                worker: int = 0) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; returns the exit code."""
    # Handlers first: a SIGTERM during start-up (or right after the ready line) must
    # still shut down gracefully, not kill the process.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = Metrics(registry)
    metrics.serve_from(loop)
    flushing = asyncio.create_task(metrics.flush_periodically(), name="metrics-flush")
    probes = ProbeState()
    heartbeat = asyncio.create_task(probes.beat(), name="probe-heartbeat")  # until exit
    probe_start = None  # the probe process starts while the models load
    if settings.probe_port is not None:
        probe_start = asyncio.create_task(asyncio.to_thread(
            ProbeServer.start, probes.shared, settings.loop_stall_s, settings.host,
            settings.probe_port, reuse_port))
    try:
        running = await start_server(settings, metrics, reuse_port, probes, worker)
    except BaseException:
        if probe_start is not None:
            with contextlib.suppress(OSError):
                (await probe_start).stop()
        raise
    try:
        probe_server = await probe_start if probe_start is not None else None
    except OSError:
        await running.stop(0)
        raise
    ready = [m.name for m in running.models if m.ready]
    log.info("listening on %s:%d (%s%s)%s; serving %s", settings.host, running.port,
             "mutual TLS" if settings.tls_client_ca_file else "TLS" if settings.tls
             else "plaintext", ", bearer tokens" if settings.auth else "",
             (f", REST on {running.http_port}" if running.http_port else "")
             + (f", probes on {probe_server.port}" if probe_server else ""), ", ".join(ready))
    unready = "; ".join(f"model {m.name} ({bounded(m.reason, 200)})"
                        for m in running.models if not m.ready)
    # What start-up built (models, sessions, protocol descriptors) lives as long as the
    # process: out of the collector's reach, a full collection no longer walks it (with
    # it, one took ~50 ms on the event loop under load: docs/results.md).
    gc.freeze()
    print(ready_line("cnnserve", settings.host, running.port, unready), flush=True)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (grace %.1fs)", settings.grace_period_s)
    await running.stop(settings.grace_period_s)
    heartbeat.cancel()
    flushing.cancel()
    metrics.flush()  # with --workers, the parent serves only what was flushed
    if probe_server is not None:
        probe_server.stop()
    log.info("stopped")
    return 0


def run(settings: ServiceSettings, reuse_port: bool = False, worker: int = 0) -> int:
    registry = CollectorRegistry()
    if settings.metrics_port is not None:  # workers' registries are not served
        register_gpu_metrics(registry)
    try:
        with MetricsServer.serving(registry, settings.host, settings.metrics_port):
            return asyncio.run(serve(settings, registry, reuse_port, worker))
    except (OSError, ValueError, RepositoryError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
