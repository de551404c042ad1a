"""Dynamic batching: concurrent requests for one model are run as one onnxruntime batch.

A batch leaves the queue when it reaches `max_batch_size`, when it reaches a preferred
size with nothing more waiting, or when its oldest request has waited
`max_queue_delay`, whichever comes first. Compute runs in a thread pool, so the next
batch gathers while the current one runs; each model instance has its own worker.

When a batch ends and the next one is already ready, the compute thread takes and runs it
at once: a busy model never idles while the event loop gets round to it. The queue is
shared with those threads under a lock; futures are only ever resolved on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
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
        self._stats = stats
        # Children looked up once (a lookup per request shows in profiles); each exports
        # zeros from the start, not from the first request.
        self._depth = metrics.queue_depth.labels(name)
        self._queue_wait = metrics.queue_wait.labels(name)
        self._compute = metrics.compute.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._inferences = metrics.inferences.labels(name)
        self._executions = metrics.executions.labels(name)
        self._queue: deque[_Request] = deque()
        self._lock = threading.Lock()  # guards _queue: the loop adds, compute threads take
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
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
        request = _Request(inputs, asyncio.get_running_loop().create_future(), time.monotonic(),
                           deadline)
        with self._lock:
            if len(self._queue) >= self.max_queue_size:
                raise QueueFullError(f"model {self.name!r} has {len(self._queue)} requests "
                                     f"queued (limit {self.max_queue_size}); retry later")
            self._queue.append(request)
            self._depth.inc()
        self._arrived.set()
        return await request.future

    async def close(self) -> None:
        """Run everything already queued, then stop the workers."""
        self._closing = True
        self._arrived.set()
        await asyncio.gather(*self._workers)

    def _take(self) -> tuple[list[_Request] | None, list[_Request], float | None]:
        """Under the lock, from the loop or a compute thread: the batch to run now, the
        expired requests it removed on the way, and when to look again if no batch is ready
        (None: the queue is empty). Cancelled requests are dropped wherever they sit.
        """
        with self._lock:
            now = time.monotonic()
            alive: deque[_Request] = deque()
            expired: list[_Request] = []
            for request in self._queue:
                if request.future.done():
                    continue
                if request.deadline is not None and now >= request.deadline:
                    expired.append(request)
                else:
                    alive.append(request)
            if len(alive) < len(self._queue):
                self._depth.dec(len(self._queue) - len(alive))
            self._queue = alive
            if not alive:
                return None, expired, None
            taken, rows = 0, 0
            for request in alive:
                if rows + len(request.inputs) > self.max_batch_size:
                    break
                taken, rows = taken + 1, rows + len(request.inputs)
            head = alive[0].enqueued
            full = rows == self.max_batch_size or taken < len(alive)
            preferred = rows in self.preferred and taken == len(alive)
            if not (full or preferred or now - head >= self.max_queue_delay_s
                    or self._closing):
                # Less than one batch is queued, so this scan is short.
                wake = min([head + self.max_queue_delay_s,
                            *(r.deadline for r in alive if r.deadline is not None)])
                return None, expired, wake
            batch = [alive.popleft() for _ in range(taken)]
        self._depth.dec(taken)
        return batch, expired, None

    def _fail_expired(self, expired: list[_Request]) -> None:
        now = time.monotonic()
        for request in expired:
            if not request.future.done():
                request.future.set_exception(DeadlineExceededError(
                    f"deadline passed after {now - request.enqueued:.3f}s in the queue of "
                    f"model {self.name!r}, before compute"))

    async def _next_batch(self) -> list[_Request] | None:
        while True:
            batch, expired, wake = self._take()
            self._fail_expired(expired)
            if batch is not None:
                return batch
            self._arrived.clear()
            if wake is None:
                if self._closing:
                    return None
                await self._arrived.wait()
                continue
            # Sleep until the head's delay is over, a request arrives, or the first
            # deadline passes (so an expired request is failed then, not when its batch
            # forms). loop.time() is time.monotonic(): one timer, not a wait_for task.
            timer = asyncio.get_running_loop().call_at(wake, self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                timer.cancel()

    async def _work(self, runner: ModelRunner) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._next_batch()) is not None:
            await loop.run_in_executor(self._executor, self._compute_while_ready, runner, batch)

    def _compute_while_ready(self, runner: ModelRunner, batch: list[_Request] | None) -> None:
        """In a compute thread: run `batch`, then each batch that is ready when one ends."""
        loop = self._loop
        assert loop is not None, "start() first"
        while batch is not None:
            started = time.monotonic()
            inputs = batch[0].inputs if len(batch) == 1 else np.concatenate(
                [r.inputs for r in batch])
            result: np.ndarray | InferenceError
            try:
                result = runner.run(inputs)
            except Exception as exc:  # onnxruntime errors: fail this batch, keep serving
                log.exception("model %s: batch of %d failed", self.name, len(inputs))
                result = InferenceError(
                    f"model {self.name!r} failed on a batch of {len(inputs)}: {exc}")
            loop.call_soon_threadsafe(self._finish, batch, started, time.monotonic(), result)
            batch, expired, _ = self._take()
            if expired:
                loop.call_soon_threadsafe(self._fail_expired, expired)

    def _finish(self, batch: list[_Request], started: float, ended: float,
                result: np.ndarray | InferenceError) -> None:
        """On the loop: record the batch and answer its requests."""
        for request in batch:
            self._queue_wait.observe(started - request.enqueued)
            self._stats.queue.add(started - request.enqueued)
        if isinstance(result, InferenceError):
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(result)
            return
        compute, size = ended - started, len(result)
        self._compute.observe(compute)
        self._batch_size.observe(size)
        self._inferences.inc(size)
        self._executions.inc()
        self._stats.record_batch(size, compute)
        offset = 0
        for request in batch:
            rows = len(request.inputs)
            if not request.future.done():  # cancelled while computing: nobody to tell
                request.future.set_result(result[offset:offset + rows])
            offset += rows
