"""Prometheus metrics and Triton-style per-model statistics.

Metrics live in a registry owned by the server (no module-level state). The hot path
never calls prometheus_client: each call, batch and request adds to plain tallies
(`Metrics.requests`, `latency`, `in_flight`, and each model's `ModelTally`), which only
the event loop's thread writes, and `Metrics.flush` moves them into the registry's
metrics on that thread: before every scrape, and every second. A prometheus_client
update takes a lock and five to eight Python calls; per request that was a fifth of the
service's own work on the event loop (docs/results.md).

With `--workers N` each process writes prometheus_client's multiprocess files at each
flush and the parent serves their sum, so the scrape shows the whole server (at most
one flush period old).
"""

from __future__ import annotations

import asyncio
import platform
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import onnxruntime
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from service import __version__
from service.status import Status

LATENCY_BUCKETS = tuple(round(us * 1e-6, 9) for us in (
    25, 50, 75, 100, 125, 150, 200, 250, 300, 400, 500, 600, 750)) + tuple(
    round(m * 10.0**e, 9) for e in range(-3, 1) for m in (1, 1.5, 2, 3, 5, 7.5)) + (10.0,)
"""25 us to 10 s: steps of 25-33% below a millisecond, where small models' batches run,
then six to a decade up to the slowest CPU batches, so that percentiles read from any of
them are close to the truth."""
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
FLUSH_EVERY_S = 1.0
SCRAPE_WAIT_S = 1.0
"""How long a scrape waits for the event loop to flush; past it (a loop stalled in a long
batch) it answers with the previous flush."""


class Buckets:
    """One histogram series as plain numbers: observations per bucket (Prometheus's
    `le` rule: the first bound at or above the value) and their sum, since the last
    flush."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class ModelTally:
    """What one model version's batcher adds up between flushes."""

    __slots__ = ("queue_wait", "compute", "batch_size", "inferences", "executions", "depth",
                 "reasons", "refused", "budget_s", "cost_s", "lateness_s")

    def __init__(self) -> None:
        self.queue_wait = Buckets(LATENCY_BUCKETS)
        self.compute = Buckets(LATENCY_BUCKETS)
        self.batch_size = Buckets(BATCH_BUCKETS)
        self.inferences = 0
        self.executions = 0
        self.depth = 0
        """Requests in its queue now (a gauge: set, never reset by a flush)."""
        self.reasons: defaultdict[str, int] = defaultdict(int)
        """Batches by why they left (`engine.batching.REASONS`)."""
        self.refused = 0
        """Requests refused because they could not be answered within the budget."""
        self.budget_s = 0.0
        """The latency budget now (a gauge; 0 under the delay rule)."""
        self.cost_s: dict[int, float] = {}
        """The cost model's estimate per batch size now (gauges)."""
        self.lateness_s = 0.0
        """How much later than estimated its answers come, at the 99th percentile."""


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # A scrape carries no `_created` series (41 of them, which no dashboard reads).
        # The switch is prometheus_client's own, process-wide, and only ever turned off.
        disable_created_metrics()
        self.registry = registry
        registry.register(_FlushFirst(self))  # before the metrics: collected in this order
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._scrape_lock = threading.Lock()
        self._pending: threading.Event | None = None
        """The flush scrapes wait for, while one is scheduled on the loop."""

        # The tallies: written on the event loop's thread only.
        self.requests: defaultdict[tuple[str, str, Status], int] = defaultdict(int)
        """Calls answered by (model, api, status), refusals before any handler included."""
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        """Calls in progress by api (a gauge)."""
        self.held_bytes = 0
        """Bytes calls in progress hold against the memory budget (a gauge)."""
        self.latency: defaultdict[tuple[str, int, str, Status], Buckets] = defaultdict(
            lambda: Buckets(LATENCY_BUCKETS))
        """Inference calls' latency by (model, version, api, status)."""
        self._models: dict[tuple[str, str], ModelTally] = {}

        self.build_info = Gauge("cnnserve_build_info",
                                "The running build: always 1, its labels say what it is.",
                                ["version", "onnxruntime", "python"],
                                multiprocess_mode="max", registry=registry)
        self.build_info.labels(__version__, onnxruntime.__version__,
                               platform.python_version()).set(1)
        self._requests = Counter("cnnserve_requests",
                                 "Calls answered, by model, API and the status the client saw "
                                 "(refusals before any handler included).",
                                 ["model", "api", "code"], registry=registry)
        self._in_flight = Gauge("cnnserve_in_flight_calls", "Calls in progress, by API.",
                                ["api"], multiprocess_mode="livesum", registry=registry)
        self._held_bytes = Gauge("cnnserve_memory_held_bytes",
                                 "Bytes that calls in progress hold against the memory budget.",
                                 multiprocess_mode="livesum", registry=registry)
        self.connections = Gauge("cnnserve_open_connections",
                                 "Client TCP connections open to the gRPC port.",
                                 multiprocess_mode="livesum", registry=registry)
        self._latency = Histogram("cnnserve_request_latency_seconds",
                                  "Latency of inference calls from the model's lookup to the "
                                  "answer, failed ones included, by the status they ended "
                                  "with.", ["model", "version", "api", "code"],
                                  buckets=LATENCY_BUCKETS, registry=registry)
        model = ["model", "version"]
        self._queue_wait = Histogram("cnnserve_queue_wait_seconds",
                                     "Time a request waited in the batcher before compute.",
                                     model, buckets=LATENCY_BUCKETS, registry=registry)
        self._compute = Histogram("cnnserve_compute_seconds",
                                  "Time per executed batch: assembling it, onnxruntime's run.",
                                  model, buckets=LATENCY_BUCKETS, registry=registry)
        self._batch_size = Histogram("cnnserve_batch_size", "Images per executed batch.",
                                     model, buckets=BATCH_BUCKETS, registry=registry)
        self._queue_depth = Gauge("cnnserve_queue_depth", "Requests waiting in the batcher.",
                                  model, multiprocess_mode="livesum", registry=registry)
        self._inferences = Counter("cnnserve_inferences",
                                   "Images inferred (Triton's inference_count).", model,
                                   registry=registry)
        self._executions = Counter("cnnserve_executions",
                                   "Batches executed (Triton's execution_count).", model,
                                   registry=registry)
        self._reasons = Counter("cnnserve_batches",
                                "Batches executed, by why they left the queue: full, target "
                                "(enough for the arrival rate), budget (the oldest could "
                                "wait no longer), delay (Triton's rule), drain.",
                                [*model, "reason"], registry=registry)
        self._refused = Counter("cnnserve_budget_refusals",
                                "Requests refused at once because the queue ahead could not "
                                "be served within the model's latency budget.", model,
                                registry=registry)
        self._budget = Gauge("cnnserve_latency_budget_seconds",
                             "The model's latency budget per request (set, or derived from "
                             "its measured cost).", model, multiprocess_mode="max",
                             registry=registry)
        self._placed = Gauge("cnnserve_model_info",
                             "Where each model version runs: always 1, its labels say the "
                             "execution provider onnxruntime applied and the file served.",
                             [*model, "provider", "file"], multiprocess_mode="max",
                             registry=registry)
        self._gpu_memory = Gauge("cnnserve_model_gpu_memory_bytes",
                                 "GPU memory a model version took as it loaded and warmed "
                                 "up (its sessions' arenas), summed over worker processes.",
                                 model, multiprocess_mode="livesum", registry=registry)
        self._lateness = Gauge("cnnserve_answer_lateness_seconds",
                               "How much later than admission estimated a model's answers "
                               "come (a running 99th percentile); admission adds it to its "
                               "estimate.", model, multiprocess_mode="max", registry=registry)
        self._cost = Gauge("cnnserve_batch_cost_seconds",
                           "The batcher's estimate of one run's time at each batch size.",
                           [*model, "batch_size"], multiprocess_mode="max", registry=registry)

    def model(self, name: str, version: str) -> ModelTally:
        """The tally of one model version's batcher; its series export zeros from now on,
        not from its first request."""
        key = (name, version)
        tally = self._models.get(key)
        if tally is None:
            tally = self._models[key] = ModelTally()
            for metric in (self._queue_wait, self._compute, self._batch_size,
                           self._queue_depth, self._inferences, self._executions,
                           self._refused, self._budget, self._lateness):
                metric.labels(name, version)
        return tally

    def model_placed(self, name: str, version: str, provider: str, file: str) -> None:
        """Where a model version serves from (called once it is ready)."""
        self._placed.labels(name, version, provider, file).set(1)

    def model_gpu_memory(self, name: str, version: str, used: int) -> None:
        self._gpu_memory.labels(name, version).set(used)

    def serve_from(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop whose thread writes the tallies: a scrape from another thread asks it
        to flush. Unset, a scrape flushes in its own thread (tests without a loop)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    async def flush_periodically(self, every_s: float = FLUSH_EVERY_S) -> None:
        """Flush every `every_s` until cancelled (with --workers, the parent reads only
        what was flushed)."""
        while True:
            await asyncio.sleep(every_s)
            self.flush()

    def flush(self) -> None:
        """Move the tallies into the registry's metrics, on the thread that writes them."""
        requests, self.requests = self.requests, defaultdict(int)
        for (model, api, status), n in requests.items():
            self._requests.labels(model, api, status.name).inc(n)
        for api, n in list(self.in_flight.items()):
            self._in_flight.labels(api).set(n)
        self._held_bytes.set(self.held_bytes)
        for (model, number, api, status), buckets in self.latency.items():
            _add(self._latency.labels(model, str(number), api, status.name), buckets)
        for (name, version), tally in self._models.items():
            _add(self._queue_wait.labels(name, version), tally.queue_wait)
            _add(self._compute.labels(name, version), tally.compute)
            _add(self._batch_size.labels(name, version), tally.batch_size)
            self._queue_depth.labels(name, version).set(tally.depth)
            if tally.executions:
                self._inferences.labels(name, version).inc(tally.inferences)
                self._executions.labels(name, version).inc(tally.executions)
                tally.inferences = tally.executions = 0
            reasons, tally.reasons = tally.reasons, defaultdict(int)
            for reason, n in reasons.items():
                self._reasons.labels(name, version, reason).inc(n)
            if tally.refused:
                self._refused.labels(name, version).inc(tally.refused)
                tally.refused = 0
            self._budget.labels(name, version).set(tally.budget_s)
            self._lateness.labels(name, version).set(tally.lateness_s)
            for rows, seconds in list(tally.cost_s.items()):
                self._cost.labels(name, version, str(rows)).set(seconds)

    def _flush_for_scrape(self) -> None:
        """Flush on the loop and wait for it (at most SCRAPE_WAIT_S). Scrapes that arrive
        while a flush is pending wait for that one: a flood of scrapes costs the loop one
        flush at a time, not one each."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread or loop.is_closed():
            self.flush()
            return
        with self._scrape_lock:
            done = self._pending
            if done is None:
                done = self._pending = threading.Event()
                try:
                    loop.call_soon_threadsafe(self._flush_pending, done)
                except RuntimeError:  # the loop closed meanwhile
                    self._pending = None
                    return
        done.wait(SCRAPE_WAIT_S)

    def _flush_pending(self, done: threading.Event) -> None:
        with self._scrape_lock:
            self._pending = None
        try:
            self.flush()
        finally:
            done.set()


def _add(child: Histogram, buckets: Buckets) -> None:
    """Add a tally's observations to a histogram series and reset the tally.

    prometheus_client has no call for many observations at once; its histogram child
    keeps a sum and per-bucket counts (not cumulative), which this adds to
    (tests/service/observability/test_metrics.py holds it to `observe`)."""
    counts = buckets.counts
    if not any(counts):
        return
    child._sum.inc(buckets.total)  # noqa: SLF001
    for i, n in enumerate(counts):
        if n:
            child._buckets[i].inc(n)  # noqa: SLF001
            counts[i] = 0
    buckets.total = 0.0


class _FlushFirst(Collector):
    """Registered before every metric, so each collection (a scrape) flushes first."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        self._metrics._flush_for_scrape()  # noqa: SLF001
        return ()


@dataclass(slots=True)
class Duration:
    """How many of a thing, and their time in all."""

    count: int = 0
    seconds: float = 0.0

    @property
    def ns(self) -> int:
        return int(self.seconds * 1e9)


@dataclass
class Compute:
    """A batch's three phases, as Triton splits them: assembling the input batch, the
    onnxruntime run, and splitting the output among the requests."""

    input: Duration = field(default_factory=Duration)
    infer: Duration = field(default_factory=Duration)
    output: Duration = field(default_factory=Duration)


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

    def record_batch(self, size: int, queued_s: Sequence[float], input_s: float,
                     infer_s: float, output_s: float) -> None:
        """A batch of `size` rows that answered requests which waited `queued_s`."""
        answered = len(queued_s)
        self.inference_count += size
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        self.queue.count += answered
        self.queue.seconds += sum(queued_s)
        compute, batch = self.compute, self.batches[size]
        for phase, batch_phase, seconds in ((compute.input, batch.input, input_s),
                                            (compute.infer, batch.infer, infer_s),
                                            (compute.output, batch.output, output_s)):
            phase.count += answered  # each request, with its batch's time
            phase.seconds += seconds * answered
            batch_phase.count += 1
            batch_phase.seconds += seconds
