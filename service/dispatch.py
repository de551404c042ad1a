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


async def infer(model: ServedModel, inputs: np.ndarray, context: grpc.aio.ServicerContext
                ) -> np.ndarray:
    """Batch `inputs` with other requests for `model`; map batcher failures to statuses."""
    assert model.batcher is not None  # find_model only returns ready models
    if len(inputs) > model.max_batch_size:
        invalid(f"model {model.name!r} takes at most {model.max_batch_size} images per "
                f"request (its max_batch_size), got {len(inputs)}")
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    try:
        return await model.batcher.infer(inputs, deadline)
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
        elapsed = time.perf_counter() - started
        # Unknown names are not labels: a client must not be able to grow the metric set.
        model = call.model
        metrics.requests.labels(model.name if model else "unknown", api, code.name).inc()
        if model is not None:
            metrics.latency.labels(model.name, api).observe(elapsed)
            (model.stats.success if code == grpc.StatusCode.OK else model.stats.fail).add(elapsed)
