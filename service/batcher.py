"""Dynamic batching: concurrent requests for one model are run as one onnxruntime batch.

A batch leaves the queue when it reaches `max_batch_size`, when it reaches a preferred
size with nothing more waiting, or when its oldest request has waited
`max_queue_delay`, whichever comes first. Compute runs in a thread pool, so the next
batch gathers while the current one runs; each model instance has its own worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.metrics import Metrics, ModelStats
from service.runtime import ModelRunner

log = logging.getLogger(__name__)


class BatcherError(Exception):
    """A request the batcher could not run; the API layer maps each kind to a gRPC status."""


class QueueFullError(BatcherError):
    pass


class DeadlineExceededError(BatcherError):
    pass


class BatcherClosedError(BatcherError):
    pass


class InferenceError(BatcherError):
    pass


@dataclass(eq=False)
class _Request:
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float
    deadline: float | None


class DynamicBatcher:
    def __init__(self, name: str, runners: Sequence[ModelRunner], executor: Executor,
                 max_batch_size: int, max_queue_delay_s: float,
                 preferred_batch_sizes: Sequence[int], max_queue_size: int,
                 metrics: Metrics, stats: ModelStats) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.preferred = frozenset(preferred_batch_sizes)
        self.max_queue_size = max_queue_size
        self._runners = list(runners)
        self._executor = executor
        self._metrics, self._stats = metrics, stats
        for family in (metrics.queue_depth, metrics.queue_wait, metrics.compute,
                       metrics.batch_size, metrics.inferences, metrics.executions):
            family.labels(name)  # export zeros from the start, not from the first request
        self._queue: deque[_Request] = deque()
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(runner), name=f"batcher-{self.name}-{i}")
                         for i, runner in enumerate(self._runners)]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def infer(self, inputs: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Queue `inputs` (n, C, H, W) and wait for its n rows of output.

        `deadline` is a `time.monotonic()` instant; a request still queued then is dropped.
        Cancelling the awaiting task removes the request before it reaches the model.
        """
        if self._closing:
            raise BatcherClosedError(f"model {self.name!r} is shutting down")
        rows = len(inputs)
        if not 1 <= rows <= self.max_batch_size:
            raise ValueError(f"expected 1 to {self.max_batch_size} images per request for "
                             f"model {self.name!r}, got {rows}")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFullError(f"model {self.name!r} has {len(self._queue)} requests queued "
                                 f"(limit {self.max_queue_size}); retry later")
        request = _Request(inputs, asyncio.get_running_loop().create_future(), time.monotonic(),
                           deadline)
        self._queue.append(request)
        self._metrics.queue_depth.labels(self.name).inc()
        self._arrived.set()
        return await request.future

    async def close(self) -> None:
        """Run everything already queued, then stop the workers."""
        self._closing = True
        self._arrived.set()
        await asyncio.gather(*self._workers)

    def _take_dead(self) -> None:
        """Drop cancelled requests and fail expired ones, wherever they sit in the queue."""
        now = time.monotonic()
        alive: deque[_Request] = deque()
        for request in self._queue:
            if request.future.done():
                continue
            if request.deadline is not None and now >= request.deadline:
                request.future.set_exception(DeadlineExceededError(
                    f"deadline passed after {now - request.enqueued:.3f}s in the queue of "
                    f"model {self.name!r}, before compute"))
                continue
            alive.append(request)
        dropped = len(self._queue) - len(alive)
        if dropped:
            self._metrics.queue_depth.labels(self.name).dec(dropped)
            self._queue = alive

    def _ready_batch(self) -> list[_Request] | None:
        """The requests to run now, or None if the head of the queue should wait longer."""
        taken, rows = 0, 0
        for request in self._queue:
            if rows + len(request.inputs) > self.max_batch_size:
                break
            taken, rows = taken + 1, rows + len(request.inputs)
        waited = time.monotonic() - self._queue[0].enqueued
        full = rows == self.max_batch_size or taken < len(self._queue)
        preferred = rows in self.preferred and taken == len(self._queue)
        if not (full or preferred or waited >= self.max_queue_delay_s or self._closing):
            return None
        batch = [self._queue.popleft() for _ in range(taken)]
        self._metrics.queue_depth.labels(self.name).dec(taken)
        return batch

    async def _next_batch(self) -> list[_Request] | None:
        while True:
            self._take_dead()
            if not self._queue:
                if self._closing:
                    return None
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = self._ready_batch()
            if batch is not None:
                return batch
            # Sleep until the head's delay is over, a request arrives, or the first
            # deadline passes (so an expired request is failed then, not when its batch
            # forms). The queue holds less than one batch here, so the scan is short.
            wake = min([self._queue[0].enqueued + self.max_queue_delay_s,
                        *(r.deadline for r in self._queue if r.deadline is not None)])
            self._arrived.clear()
            # loop.time() is time.monotonic(): one timer instead of a wait_for task.
            timer = asyncio.get_running_loop().call_at(wake, self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                timer.cancel()

    async def _work(self, runner: ModelRunner) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._next_batch()) is not None:
            started = time.monotonic()
            for request in batch:
                self._metrics.queue_wait.labels(self.name).observe(started - request.enqueued)
                self._stats.queue.add(started - request.enqueued)
            inputs = batch[0].inputs if len(batch) == 1 else np.concatenate(
                [r.inputs for r in batch])
            try:
                outputs = await loop.run_in_executor(self._executor, runner.run, inputs)
            except Exception as exc:  # onnxruntime errors: fail this batch, keep serving
                log.exception("model %s: batch of %d failed", self.name, len(inputs))
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(InferenceError(
                            f"model {self.name!r} failed on a batch of {len(inputs)}: {exc}"))
                continue
            compute = time.monotonic() - started
            self._metrics.compute.labels(self.name).observe(compute)
            self._metrics.batch_size.labels(self.name).observe(len(inputs))
            self._metrics.inferences.labels(self.name).inc(len(inputs))
            self._metrics.executions.labels(self.name).inc()
            self._stats.record_batch(len(inputs), compute)
            offset = 0
            for request in batch:
                rows = len(request.inputs)
                if not request.future.done():  # cancelled while computing: nobody to tell
                    request.future.set_result(outputs[offset:offset + rows])
                offset += rows
