"""The inference core: every front-end's request goes down through `InferenceCore`.

A front-end translates its wire format into an `InferRequest` (the model asked for, and
a payload of the core's own types: the protocol's tensors, or images to classify) and
maps `ServingError.status` back to its protocol. Everything else happens here, once, in
this order: resolve the model, check the payload against the model that will run it
(again for the new version if a hot reload retires that one), give it a deadline, batch
and run it, record the outcome.

`infer` is the one path: it awaits the decode pool for images, then the model's
batcher, and records the outcome once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.core.admission import Call, Kind
from service.engine.batcher import BatcherClosedError
from service.engine.models import ModelNotFoundError, ModelSet, ServedModel
from service.engine.runtime import Tensors
from service.observability.metrics import Metrics
from service.status import ServingError, Status, invalid, outcome

__all__ = ["InferRequest", "InferResult", "InferenceCore", "Job", "RequestLimits",
           "ServingError", "Status", "invalid"]


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits from the settings, the same for every front-end."""

    max_images_per_request: int
    request_timeout_s: float


class Payload(Protocol):
    """What a request carries, in the core's own types (core.oip, core.classify)."""

    @property
    def rows(self) -> int:
        """Rows (images) the request declares, checked against a batching model's limit
        before `tensors` decodes any of them."""
    @property
    def offload(self) -> bool:
        """`tensors` decodes images: run it in the decode pool, never on the event loop;
        it stops between images once `Call.stop` is set."""
    def tensors(self, model: ServedModel, call: Call) -> Tensors:
        """The model's inputs by name (ServingError if they do not fit), charging `call`
        for what it decodes."""


@dataclass(slots=True)  # built once per call: slots, not frozen (cheaper to construct)
class InferRequest:
    """One inference call as the core sees it, whatever protocol carried it."""

    api: str
    """The front-end's name for the metrics' `api` label."""
    model: str
    version: str
    """The version asked for; "" for the one served now."""
    payload: Payload
    timeout_s: float | None
    """What the client's deadline leaves; None when it set none."""
    call: Call | None
    """The call the edge admitted: charged and labelled here. None in process (tests)."""


@dataclass(slots=True)
class InferResult:
    model: ServedModel
    """The model that ran the request (after a hot reload, the new version)."""
    outputs: list[np.ndarray]
    """In the order of the model's configured outputs."""


class Job:
    """One inference call inside the core, from the model's lookup to its outcome: in
    flight (shutdown waits for it) until `end`, which records it once."""

    __slots__ = ("core", "call", "model", "started", "deadline", "ended")

    def __init__(self, core: InferenceCore, call: Call, model: ServedModel, started: float,
                 deadline: float) -> None:
        self.core = core
        self.call = call
        self.model = model
        self.started = started
        self.deadline = deadline
        self.ended = False

    def done(self, outputs: list[np.ndarray]) -> InferResult:
        """The outputs, charged to the call (RESOURCE_EXHAUSTED past its budget)."""
        nbytes = 0
        for array in outputs:
            nbytes += array.nbytes
        try:
            self.call.charge(nbytes, "the response")
        except ServingError as exc:
            self.end(exc.status)
            raise
        self.end(Status.OK)
        return InferResult(self.model, outputs)

    def end(self, status: Status) -> None:
        """Out of flight, into the model's statistics (Triton's: success or fail) and the
        latency histogram, once; the edge counts the call."""
        if self.ended:
            return
        self.ended = True
        core, model = self.core, self.model
        core.in_flight -= 1
        elapsed = time.monotonic() - self.started
        stats = model.stats.success if status is Status.OK else model.stats.fail
        stats.count += 1
        stats.seconds += elapsed
        core.metrics.latency[model.name, model.version, self.call.api, status].observe(elapsed)


class InferenceCore:
    def __init__(self, models: ModelSet, metrics: Metrics, limits: RequestLimits,
                 decoder: Executor) -> None:
        self.models = models
        self.metrics = metrics
        self.limits = limits
        self.decoder = decoder
        """A small bounded pool for image decoding, apart from onnxruntime's threads."""
        self.in_flight = 0
        """Calls being handled now: shutdown waits for them."""
        self.last_call_at = 0.0
        """time.monotonic() when the latest call arrived: shutdown waits for a quiet spell."""
        self.draining = False
        """Set at shutdown: the server answers not ready while it finishes what it holds."""

    @property
    def ready(self) -> bool:
        """Every model is ready and the server is not shutting down."""
        return self.models.all_ready and not self.draining

    def drain(self) -> None:
        self.draining = True

    async def infer(self, request: InferRequest) -> InferResult:
        """Run `request` on the model it names, batched with others; ServingError if it
        cannot run. Images are decoded in the decode pool first."""
        job = self._open(request)
        payload = request.payload
        try:
            while True:
                self._check_rows(job.model, payload.rows)
                inputs = (await self._decode(payload, job) if payload.offload
                          else payload.tensors(job.model, job.call))
                try:
                    outputs = await self._run(job, payload.rows, inputs)
                    break
                except BatcherClosedError:
                    self._move_to_successor(job)
        except BaseException as exc:
            job.end(outcome(exc))
            raise
        return job.done(outputs)

    def model(self, name: str, version: str = "", call: Call | None = None) -> ServedModel:
        """The ready model behind `name` (for metadata), labelling `call` with it; not in
        the model's statistics, which are Triton's and count inferences only."""
        model = self._resolve(name, version)
        if call is not None:
            call.model = model.name
        return model

    def statistics(self, name: str, version: str = "", call: Call | None = None
                   ) -> list[ServedModel]:
        """The models whose statistics were asked for: one by name, or every one."""
        return [self.model(name, version, call)] if name else list(self.models)

    def find(self, name: str, version: str = "") -> ServedModel:
        """The model served under `name` (at `version`, if given), ready or not; NOT_FOUND
        if there is none."""
        try:
            return self.models.get(name, version)
        except ModelNotFoundError as exc:
            raise ServingError(Status.NOT_FOUND, str(exc)) from None

    def _open(self, request: InferRequest) -> Job:
        """The request's job: its model resolved, its rows checked, its call labelled,
        its deadline set."""
        call = request.call or Call(request.api, "in-process", Kind.WORK)
        model = self._resolve(request.model, request.version)
        call.model = model.name
        now = time.monotonic()
        timeout = self.limits.request_timeout_s
        if request.timeout_s is not None and request.timeout_s < timeout:
            timeout = request.timeout_s
        self.last_call_at = now
        self.in_flight += 1
        return Job(self, call, model, now, now + timeout)

    async def _run(self, job: Job, rows: int, inputs: Tensors) -> list[np.ndarray]:
        """Charge what the request will hold, then await its model's batcher."""
        model, call = job.model, job.call
        nbytes = 0
        for array in inputs.values():
            # Made for it (not a view of bytes already charged); a DeviceTensor may be
            # copied to host memory.
            if not isinstance(array, np.ndarray) or array.base is None:
                nbytes += array.nbytes
        if nbytes:
            call.charge(nbytes, "the request's tensors")
        batcher = model.batcher
        assert batcher is not None  # a ready model has one
        admission = call.admission
        alone = self.in_flight == 1 and (admission is None or admission.calls <= 1)
        return await batcher.infer(inputs, rows if model.policy.max_batch_size else 1,
                                   job.started, job.deadline, alone)

    def _move_to_successor(self, job: Job) -> None:
        """A hot reload retired the job's version after the request found it: the version
        now served takes the request, checked against it afresh (UNAVAILABLE if none)."""
        successor = self.models.current(job.model.name)
        if successor is None or successor is job.model or not successor.ready:
            raise ServingError(Status.UNAVAILABLE, f"model {job.model.name!r} is shutting down")
        job.model = successor

    async def _decode(self, payload: Payload, job: Job) -> Tensors:
        call = job.call
        stop = call.stop = call.stop or threading.Event()  # kept if a hot reload retries
        work = asyncio.get_running_loop().run_in_executor(
            self.decoder, payload.tensors, job.model, call)
        try:
            return await asyncio.wait_for(work, max(job.deadline - time.monotonic(), 0.0))
        except TimeoutError:
            stop.set()  # the decoder stops between images; a queued one never starts
            raise ServingError(Status.DEADLINE_EXCEEDED,
                               "the deadline passed while the images were decoded") from None
        except asyncio.CancelledError:
            stop.set()
            raise

    def _resolve(self, name: str, version: str) -> ServedModel:
        model = self.find(name, version)
        if not model.ready:
            raise ServingError(Status.UNAVAILABLE,
                               f"model {name!r} is not ready: {model.reason or 'loading'}")
        return model

    def _check_rows(self, model: ServedModel, rows: int) -> None:
        """A batching model's limit on images per request (the server's, if lower); a
        model without a batch dimension has its tensors' shapes checked whole."""
        batch = model.policy.max_batch_size
        if batch and (rows > batch or rows > self.limits.max_images_per_request):
            limit = min(batch, self.limits.max_images_per_request)
            invalid(f"model {model.name!r} takes at most {limit} images per request (its "
                    f"max_batch_size {model.max_batch_size}, server max_images_per_request "
                    f"{self.limits.max_images_per_request}), got {rows}")
