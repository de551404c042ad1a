"""From an API handler to the batcher: deadlines, gRPC status codes, metrics, statistics.

Both APIs (Open Inference Protocol and the classifier) go through `infer`, so every
request is admitted, timed and answered by the same rules.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import grpc
import numpy as np

from service.batcher import (
    BatcherClosedError,
    DeadlineExceededError,
    InferenceError,
    QueueFullError,
)
from service.metrics import Metrics
from service.models import ModelNotFoundError, ModelSet, ServedModel

T = TypeVar("T")


class RequestError(Exception):
    """A request the server refuses, with the gRPC status to refuse it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> NoReturn:
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def find_model(models: ModelSet, name: str, version: str = "") -> ServedModel:
    try:
        model = models.get(name, version)
    except ModelNotFoundError as exc:
        raise RequestError(grpc.StatusCode.NOT_FOUND, str(exc)) from None
    if not model.ready:
        raise RequestError(grpc.StatusCode.UNAVAILABLE,
                           f"model {name!r} is not ready: {model.reason or 'loading'}")
    return model


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits from the settings, shared by both APIs."""

    max_images_per_request: int
    max_image_pixels: int
    request_timeout_s: float


def check_image_count(model: ServedModel, count: int, limits: RequestLimits) -> None:
    """Refuse a request before its images are decoded if it holds too many."""
    limit = min(model.max_batch_size, limits.max_images_per_request)
    if count > limit:
        invalid(f"model {model.name!r} takes at most {limit} images per request (its "
                f"max_batch_size {model.max_batch_size}, server max_images_per_request "
                f"{limits.max_images_per_request}), got {count}")


async def infer(call: Call, models: ModelSet, inputs: np.ndarray,
                context: grpc.aio.ServicerContext, limits: RequestLimits) -> np.ndarray:
    """Batch `inputs` with other requests for `call.model`; map failures to statuses.

    If a hot reload retired the model after the request found it, the request moves to
    the version now served (and `call.model` says so) instead of failing.
    """
    model = call.model
    assert model is not None and model.batcher is not None  # set by find_model
    check_image_count(model, len(inputs), limits)
    remaining = context.time_remaining()
    timeout = limits.request_timeout_s if remaining is None else min(
        remaining, limits.request_timeout_s)
    deadline = time.monotonic() + timeout
    try:
        try:
            return await model.batcher.infer(inputs, deadline)
        except BatcherClosedError:
            current = models.models.get(model.name)
            if (current is None or current is model or not current.ready
                    or current.config.input.shape != model.config.input.shape):
                raise
            call.model = current
            assert current.batcher is not None
            return await current.batcher.infer(inputs, deadline)
    except QueueFullError as exc:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
    except DeadlineExceededError as exc:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
    except BatcherClosedError as exc:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
    except InferenceError as exc:
        raise RequestError(grpc.StatusCode.INTERNAL, str(exc)) from None


@dataclass
class Call:
    """What a handler learned about its call, for the metrics: the model, once found."""

    model: ServedModel | None = None


async def answer(metrics: Metrics, api: str, context: grpc.aio.ServicerContext,
                 handler: Callable[[Call], Awaitable[T]]) -> T:
    """Run `handler`, turning RequestError into the call's status; count and time the call."""
    started = time.perf_counter()
    metrics.last_call_at = time.monotonic()
    metrics.in_flight += 1
    call = Call()
    code = grpc.StatusCode.OK
    try:
        return await handler(call)
    except RequestError as exc:
        code = exc.code
        await context.abort(exc.code, str(exc))
        raise  # unreachable: abort raises
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception:
        code = grpc.StatusCode.INTERNAL
        raise
    finally:
        metrics.in_flight -= 1
        elapsed = time.perf_counter() - started
        # Unknown names are not labels: a client must not be able to grow the metric set.
        model = call.model
        metrics.requests.labels(model.name if model else "unknown", api, code.name).inc()
        if model is not None:
            metrics.latency.labels(model.name, api).observe(elapsed)
            (model.stats.success if code == grpc.StatusCode.OK else model.stats.fail).add(elapsed)
