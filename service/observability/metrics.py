"""Prometheus metrics and Triton-style per-model statistics.

Metrics live in a registry owned by the server (no module-level state). With
`--workers N` each process writes prometheus_client's multiprocess files and the parent
serves their sum, so the scrape shows the whole server.
"""

from __future__ import annotations

import platform
import time
from collections import defaultdict
from dataclasses import dataclass, field

import onnxruntime
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from service import __version__

LATENCY_BUCKETS = tuple(round(us * 1e-6, 9) for us in (
    25, 50, 75, 100, 125, 150, 200, 250, 300, 400, 500, 600, 750)) + tuple(
    round(m * 10.0**e, 9) for e in range(-3, 1) for m in (1, 1.5, 2, 3, 5, 7.5)) + (10.0,)
"""25 us to 10 s: steps of 25-33% below a millisecond, where small models' batches run,
then six to a decade up to the slowest CPU batches, so that percentiles read from any of
them are close to the truth."""
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # A scrape carries no `_created` series (41 of them, which no dashboard reads).
        # The switch is prometheus_client's own, process-wide, and only ever turned off.
        disable_created_metrics()
        self.registry = registry
        self.build_info = Gauge("cnnserve_build_info",
                                "The running build: always 1, its labels say what it is.",
                                ["version", "onnxruntime", "python"],
                                multiprocess_mode="max", registry=registry)
        self.build_info.labels(__version__, onnxruntime.__version__,
                               platform.python_version()).set(1)
        self.requests = Counter("cnnserve_requests",
                                "Calls answered, by model, API and the status the client saw "
                                "(refusals before any handler included).",
                                ["model", "api", "code"], registry=registry)
        self.in_flight = Gauge("cnnserve_in_flight_calls", "Calls in progress, by API.",
                               ["api"], multiprocess_mode="livesum", registry=registry)
        self.held_bytes = Gauge("cnnserve_memory_held_bytes",
                                "Bytes that calls in progress hold against the memory budget.",
                                multiprocess_mode="livesum", registry=registry)
        self.connections = Gauge("cnnserve_open_connections",
                                 "Client TCP connections open to the gRPC port.",
                                 multiprocess_mode="livesum", registry=registry)
        self.latency = Histogram("cnnserve_request_latency_seconds",
                                 "Latency of inference calls from the model's lookup to the "
                                 "answer, failed ones included, by the status they ended with.",
                                 ["model", "version", "api", "code"], buckets=LATENCY_BUCKETS,
                                 registry=registry)
        model = ["model", "version"]
        self.queue_wait = Histogram("cnnserve_queue_wait_seconds",
                                    "Time a request waited in the batcher before compute.",
                                    model, buckets=LATENCY_BUCKETS, registry=registry)
        self.compute = Histogram("cnnserve_compute_seconds",
                                 "Time per executed batch: assembling it, onnxruntime's run.",
                                 model, buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("cnnserve_batch_size", "Images per executed batch.",
                                    model, buckets=BATCH_BUCKETS, registry=registry)
        self.queue_depth = Gauge("cnnserve_queue_depth", "Requests waiting in the batcher.",
                                 model, multiprocess_mode="livesum", registry=registry)
        self.inferences = Counter("cnnserve_inferences",
                                  "Images inferred (Triton's inference_count).", model,
                                  registry=registry)
        self.executions = Counter("cnnserve_executions",
                                  "Batches executed (Triton's execution_count).", model,
                                  registry=registry)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class Compute:
    """A batch's three phases, as Triton splits them: assembling the input batch, the
    onnxruntime run, and splitting the output among the requests."""

    input: Duration = field(default_factory=Duration)
    infer: Duration = field(default_factory=Duration)
    output: Duration = field(default_factory=Duration)

    def add(self, input_s: float, infer_s: float, output_s: float, n: int = 1) -> None:
        self.input.add(input_s, n)
        self.infer.add(infer_s, n)
        self.output.add(output_s, n)


@dataclass
class ModelStats:
    """What ModelStatistics reports for one model, with Triton's semantics: `queue` and
    `compute` count once per request answered (each with its batch's durations, so
    perf_analyzer's per-request averages come out right), `batches` once per execution."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Compute = field(default_factory=Compute)
    batches: dict[int, Compute] = field(default_factory=lambda: defaultdict(Compute))

    def record_batch(self, size: int, queued_s: list[float], input_s: float, infer_s: float,
                     output_s: float) -> None:
        """A batch of `size` rows that answered requests which waited `queued_s`."""
        self.inference_count += size
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        for waited in queued_s:
            self.queue.add(waited)
        self.compute.add(input_s, infer_s, output_s, len(queued_s))
        self.batches[size].add(input_s, infer_s, output_s)
