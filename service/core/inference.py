"""The inference core: every front-end's request goes down through `InferenceCore`.

A front-end translates its wire format into an `InferRequest` (the model asked for, and
a payload of the core's own types: the protocol's tensors, or images to classify) and
maps `ServingError.status` back to its protocol. Everything else happens here, once, in
this order: resolve the model, check the payload against the model that will run it
(again for the new version if a hot reload retires that one), give it a deadline, batch
and run it, record the outcome.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.core.admission import Call, Kind
from service.engine.batcher import (
    BatcherClosedError,
    DeadlineExceededError,
    InferenceError,
    QueueFullError,
)
from service.engine.models import ModelNotFoundError, ModelSet, ServedModel
from service.engine.runtime import Tensors
from service.observability.metrics import Metrics
from service.status import ServingError, Status, invalid, outcome

__all__ = ["InferRequest", "InferResult", "InferenceCore", "RequestLimits", "ServingError",
           "Status", "invalid"]


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


@dataclass
class _Resolved:
    model: ServedModel | None = None


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
        """Run `request` on the model it names, batched with others; ServingError if not."""
        call = request.call or Call(request.api, "in-process", Kind.WORK)
        payload = request.payload
        with self._recorded(call) as resolved:
            model = resolved.model = self._resolve(request.model, request.version)
            call.model = model.name
            timeout = self.limits.request_timeout_s if request.timeout_s is None else min(
                request.timeout_s, self.limits.request_timeout_s)
            deadline = time.monotonic() + timeout
            while True:
                self._check_rows(model, payload.rows)
                inputs = await self._prepare(payload, model, call, deadline)
                call.charge(sum(a.nbytes for a in inputs.values()), "the request's tensors")
                try:
                    outputs = await self._run(model, inputs, deadline, self._alone(call))
                    call.charge(sum(a.nbytes for a in outputs), "the response")
                    return InferResult(model, outputs)
                except BatcherClosedError as exc:
                    # A hot reload retired this version after the request found it: the
                    # version now served takes the request, checked against it afresh.
                    successor = self.models.current(model.name)
                    if successor is None or successor is model or not successor.ready:
                        raise ServingError(Status.UNAVAILABLE, str(exc)) from None
                    model = resolved.model = successor

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

    async def _prepare(self, payload: Payload, model: ServedModel, call: Call,
                       deadline: float) -> Tensors:
        if not payload.offload:
            return payload.tensors(model, call)
        stop = call.stop = call.stop or threading.Event()  # kept if a hot reload retries
        work = asyncio.get_running_loop().run_in_executor(
            self.decoder, payload.tensors, model, call)
        try:
            return await asyncio.wait_for(work, max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            stop.set()  # the decoder stops between images; a queued one never starts
            raise ServingError(Status.DEADLINE_EXCEEDED,
                               "the deadline passed while the images were decoded") from None
        except asyncio.CancelledError:
            stop.set()
            raise

    def _alone(self, call: Call) -> bool:
        """No other call is in progress: none in the core, and none the edge has admitted
        that is still on its way here (its message arriving or being parsed)."""
        admission = call.admission
        return self.in_flight == 1 and (admission is None or admission.calls <= 1)

    def find(self, name: str, version: str = "") -> ServedModel:
        """The model served under `name` (at `version`, if given), ready or not; NOT_FOUND
        if there is none."""
        try:
            return self.models.get(name, version)
        except ModelNotFoundError as exc:
            raise ServingError(Status.NOT_FOUND, str(exc)) from None

    def _resolve(self, name: str, version: str) -> ServedModel:
        model = self.find(name, version)
        if not model.ready:
            raise ServingError(Status.UNAVAILABLE,
                               f"model {name!r} is not ready: {model.reason or 'loading'}")
        return model

    def _check_rows(self, model: ServedModel, rows: int) -> None:
        if not model.config.batched:
            return  # its tensors' shapes are checked whole by the payload
        limit = min(model.max_batch_size, self.limits.max_images_per_request)
        if rows > limit:
            invalid(f"model {model.name!r} takes at most {limit} images per request (its "
                    f"max_batch_size {model.max_batch_size}, server max_images_per_request "
                    f"{self.limits.max_images_per_request}), got {rows}")

    @staticmethod
    async def _run(model: ServedModel, inputs: Tensors, deadline: float, alone: bool
                   ) -> list[np.ndarray]:
        assert model.batcher is not None  # a ready model has one
        try:
            return await model.batcher.infer(inputs, deadline, alone)
        except QueueFullError as exc:
            raise ServingError(Status.RESOURCE_EXHAUSTED, str(exc)) from None
        except DeadlineExceededError as exc:
            raise ServingError(Status.DEADLINE_EXCEEDED, str(exc)) from None
        except InferenceError as exc:
            raise ServingError(Status.INTERNAL, str(exc)) from None

    @contextmanager
    def _recorded(self, call: Call) -> Iterator[_Resolved]:
        """Time one inference, into the model's statistics; the edge counts the call."""
        started = time.perf_counter()
        self.last_call_at = time.monotonic()
        self.in_flight += 1
        resolved = _Resolved()
        status = Status.OK
        try:
            yield resolved
        except BaseException as exc:
            status = outcome(exc)
            raise
        finally:
            self.in_flight -= 1
            elapsed = time.perf_counter() - started
            model = resolved.model
            if model is not None:
                self.metrics.latency[model.name, model.version, call.api, status].observe(elapsed)
                (model.stats.success if status is Status.OK else model.stats.fail).add(elapsed)
