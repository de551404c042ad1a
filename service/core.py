"""The inference core: every front-end's request goes down through `InferenceCore`.

A front-end translates its wire format into an `InferRequest` (the model asked for, the
images it declares, and a `prepare` function that turns its payload into the input batch
of a given model) and maps `ServingError.status` back to its protocol. Everything else
happens here, once, in this order: resolve the model, check the request against the
model that will run it, admit it with a deadline, batch and run it, record the outcome.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from service.engine.batcher import (
    BatcherClosedError,
    DeadlineExceededError,
    InferenceError,
    QueueFullError,
)
from service.engine.models import ModelNotFoundError, ModelSet, ServedModel
from service.metrics import Metrics


class Status(enum.Enum):
    """Protocol-neutral outcomes; the names are gRPC's, and are the metrics' `code` label."""

    OK = enum.auto()
    CANCELLED = enum.auto()
    INVALID_ARGUMENT = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    NOT_FOUND = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    FAILED_PRECONDITION = enum.auto()
    INTERNAL = enum.auto()
    UNAVAILABLE = enum.auto()


class ServingError(Exception):
    """A request the server refuses, with the status to refuse it with."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


def invalid(message: str) -> NoReturn:
    raise ServingError(Status.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits from the settings, the same for every front-end."""

    max_images_per_request: int
    max_image_pixels: int
    request_timeout_s: float


@dataclass(slots=True)  # built once per call: slots, not frozen (5x cheaper to construct)
class InferRequest:
    """One inference call as the core sees it, whatever protocol carried it."""

    api: str
    """The front-end's name for the metrics' `api` label."""
    model: str
    version: str
    rows: int
    """Images the request declares, checked before `prepare` decodes any of them."""
    prepare: Callable[[ServedModel], np.ndarray]
    """Payload -> the input batch for this model (raises ServingError if it does not fit).
    Called again for the new version if a hot reload swaps the model mid-request."""
    timeout_s: float | None = None
    """What the client's deadline leaves; None when it set none."""
    offload: bool = False
    """`prepare` is costly (encoded images): run it off the event loop."""


@dataclass(slots=True)
class InferResult:
    model: ServedModel
    """The model that ran the request (after a hot reload, the new version)."""
    outputs: np.ndarray


@dataclass
class _Call:
    model: ServedModel | None = None


class InferenceCore:
    def __init__(self, models: ModelSet, metrics: Metrics, limits: RequestLimits) -> None:
        self.models = models
        self.metrics = metrics
        self.limits = limits
        self.in_flight = 0
        """Calls being handled now: shutdown waits for them."""
        self.last_call_at = 0.0
        """time.monotonic() when the latest call arrived: shutdown waits for a quiet spell."""

    async def infer(self, request: InferRequest) -> InferResult:
        """Run `request` on the model it names, batched with others; ServingError if not."""
        with self._recorded(request.api) as call:
            model = call.model = self._resolve(request.model, request.version)
            timeout = self.limits.request_timeout_s if request.timeout_s is None else min(
                request.timeout_s, self.limits.request_timeout_s)
            deadline = time.monotonic() + timeout
            while True:
                self._check_rows(model, request.rows)
                inputs = (await asyncio.to_thread(request.prepare, model) if request.offload
                          else request.prepare(model))
                try:
                    return InferResult(model, await self._run(model, inputs, deadline))
                except BatcherClosedError as exc:
                    # A hot reload retired this version after the request found it: the
                    # version now served takes the request, checked against it afresh.
                    successor = self.models.current(model.name)
                    if successor is None or successor is model or not successor.ready:
                        raise ServingError(Status.UNAVAILABLE, str(exc)) from None
                    model = call.model = successor

    def model(self, api: str, name: str, version: str = "") -> ServedModel:
        """The ready model behind `name` (for metadata). Counted as a call of `api`, but not
        in the model's statistics, which are Triton's and count inferences only."""
        with self._recorded(api):
            return self._resolve(name, version)

    def statistics(self, name: str, version: str = "") -> list[ServedModel]:
        """The models whose statistics were asked for: one by name, or every one."""
        with self._recorded("statistics"):
            return [self._resolve(name, version)] if name else list(self.models)

    def _resolve(self, name: str, version: str) -> ServedModel:
        try:
            model = self.models.get(name, version)
        except ModelNotFoundError as exc:
            raise ServingError(Status.NOT_FOUND, str(exc)) from None
        if not model.ready:
            raise ServingError(Status.UNAVAILABLE,
                               f"model {name!r} is not ready: {model.reason or 'loading'}")
        return model

    def _check_rows(self, model: ServedModel, rows: int) -> None:
        limit = min(model.max_batch_size, self.limits.max_images_per_request)
        if rows > limit:
            invalid(f"model {model.name!r} takes at most {limit} images per request (its "
                    f"max_batch_size {model.max_batch_size}, server max_images_per_request "
                    f"{self.limits.max_images_per_request}), got {rows}")

    @staticmethod
    async def _run(model: ServedModel, inputs: np.ndarray, deadline: float) -> np.ndarray:
        assert model.batcher is not None  # a ready model has one
        try:
            return await model.batcher.infer(inputs, deadline)
        except QueueFullError as exc:
            raise ServingError(Status.RESOURCE_EXHAUSTED, str(exc)) from None
        except DeadlineExceededError as exc:
            raise ServingError(Status.DEADLINE_EXCEEDED, str(exc)) from None
        except InferenceError as exc:
            raise ServingError(Status.INTERNAL, str(exc)) from None

    @contextmanager
    def _recorded(self, api: str) -> Iterator[_Call]:
        """Count and time one call with the status its client sees."""
        started = time.perf_counter()
        self.last_call_at = time.monotonic()
        self.in_flight += 1
        call = _Call()
        status = Status.OK
        try:
            yield call
        except ServingError as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = Status.CANCELLED
            raise
        except Exception:
            status = Status.INTERNAL
            raise
        finally:
            self.in_flight -= 1
            elapsed = time.perf_counter() - started
            # Unknown names are not labels: a client must not be able to grow the metric set.
            model = call.model
            self.metrics.requests.labels(model.name if model else "unknown", api,
                                         status.name).inc()
            if model is not None:
                self.metrics.latency.labels(model.name, api).observe(elapsed)
                (model.stats.success if status is Status.OK else model.stats.fail).add(elapsed)
