"""Dynamic batching: concurrent requests for one model are run as one onnxruntime batch.

What leaves the queue and when is decided by `batching.select_batch` (the policy's
rules); this module applies it concurrently. Compute runs in a thread pool, so the next
batch gathers while the current one runs; each model instance has its own worker.

When a batch ends and the next one is already ready, the compute thread takes and runs it
at once: a busy model never idles while the event loop gets round to it. The queue is
shared with those threads under a lock; futures are only ever resolved on the loop.

A batch of a size that recently ran in under `policy.inline_compute_s` runs on the event
loop itself: for a tiny model, handing it to a thread and the answer back costs more CPU
and latency than the run. Each size's recent compute time is tracked, so a model that
slows down (a busier host) goes back to the threads. A lone caller's request of such a
size, on a model with every instance idle, runs in the caller's own task: no queue, no
worker to wake, no future to hand back (with `work_conserving` only: Triton's policy
makes every request wait for company).
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

from service.engine.batching import BatchPolicy, Selection, select_batch
from service.engine.runtime import ModelRunner, Tensors
from service.observability.metrics import Metrics, ModelStats
from service.status import bounded

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
    inputs: Tensors
    rows: int
    shapes: tuple[tuple[int, ...], ...]
    future: asyncio.Future[list[np.ndarray]]
    enqueued: float
    deadline: float | None

    @property
    def cancelled(self) -> bool:
        return self.future.done()


class DynamicBatcher:
    def __init__(self, name: str, runners: Sequence[ModelRunner], executor: Executor,
                 policy: BatchPolicy, metrics: Metrics, stats: ModelStats,
                 version: str = "1") -> None:
        self.name = name
        self.policy = policy
        self._runners = list(runners)
        self._executor = executor
        self._stats = stats
        self._tally = metrics.model(name, version)
        self._queue: deque[_Request] = deque()
        self._lock = threading.Lock()  # guards _queue: the loop adds, compute threads take
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = 0
        """Workers waiting for a request to arrive (none queued, none computing)."""
        self._recent_compute_s: dict[int, float] = {}
        """Per batch size: a moving average of its compute time (measured on the loop)."""

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._workers = [asyncio.create_task(self._work(runner), name=f"batcher-{self.name}-{i}")
                         for i, runner in enumerate(self._runners)]

    @property
    def idle_instances(self) -> int:
        """Instances waiting for a request: nothing queued, nothing of theirs running."""
        return self._idle

    async def infer(self, inputs: Tensors, deadline: float | None = None,
                    alone: bool = False) -> list[np.ndarray]:
        """Queue `inputs` (each with n rows first, if the model batches) and wait for the
        model's outputs for them, in its configured order.

        `deadline` is a `time.monotonic()` instant; a request still queued then is dropped.
        Cancelling the awaiting task removes the request before it reaches the model.
        `alone`: no other call is in progress, so none would join this request's batch.
        The caller has checked n against the policy; a larger n is a programming error.
        """
        if self._closing:
            raise BatcherClosedError(f"model {self.name!r} is shutting down")
        batched = self.policy.max_batch_size > 0
        first = next(iter(inputs.values()))
        rows = len(first) if batched else 1
        if not 1 <= rows <= max(self.policy.max_batch_size, 1):
            raise ValueError(f"expected 1 to {self.policy.max_batch_size} rows per request "
                             f"for model {self.name!r}, got {rows}")
        shapes = tuple(a.shape[1:] if batched else a.shape for a in inputs.values())
        request = _Request(inputs, rows, shapes, asyncio.get_running_loop().create_future(),
                           time.monotonic(), deadline)
        if alone and self._runs_at_once(rows):
            self._finish([request], rows, *self._run(self._runners[0], [request], rows))
            return request.future.result()
        with self._lock:
            if len(self._queue) >= self.policy.max_queue_size:
                raise QueueFullError(f"model {self.name!r} has {len(self._queue)} requests "
                                     f"queued (limit {self.policy.max_queue_size}); retry later")
            self._queue.append(request)
            self._tally.depth += 1
        self._arrived.set()
        return await request.future

    def _runs_at_once(self, rows: int) -> bool:
        """Whether a lone request of `rows` runs in its caller's task: every instance is
        idle, and the size ran fast enough recently to run on the loop."""
        return (self.policy.work_conserving and self.idle_instances == len(self._runners)
                and not self._queue and not self._closing and self._runs_inline(rows))

    def _runs_inline(self, rows: int) -> bool:
        """A batch of `rows` recently ran under `inline_compute_s` (a new size has not)."""
        recent = self._recent_compute_s.get(rows)
        return recent is not None and recent < self.policy.inline_compute_s

    async def close(self) -> None:
        """Run everything already queued, then stop the workers."""
        self._closing = True
        self._arrived.set()
        await asyncio.gather(*self._workers)

    def _take(self) -> Selection[_Request]:
        """From the loop or a compute thread: apply `select_batch` to the queue."""
        with self._lock:
            selection = select_batch(self._queue, time.monotonic(), self.policy, self._closing)
            removed = len(self._queue) - len(selection.waiting)
            if removed:
                self._queue = deque(selection.waiting)
                self._tally.depth -= removed
        return selection

    def _fail_expired(self, expired: list[_Request]) -> None:
        now = time.monotonic()
        for request in expired:
            if not request.future.done():
                request.future.set_exception(DeadlineExceededError(
                    f"deadline passed after {now - request.enqueued:.3f}s in the queue of "
                    f"model {self.name!r}, before compute"))

    async def _next_batch(self) -> Selection[_Request] | None:
        while True:
            selection = self._take()
            self._fail_expired(selection.expired)
            if selection.batch:
                return selection
            self._arrived.clear()
            wake = selection.wake_at
            if wake is None:
                if self._closing:
                    return None
                self._idle += 1
                try:
                    await self._arrived.wait()
                finally:
                    self._idle -= 1
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
        while (selection := await self._next_batch()) is not None:
            batch, rows = selection.batch, selection.rows
            if self._runs_inline(rows):
                self._finish(batch, rows, *self._run(runner, batch, rows))
                await asyncio.sleep(0)  # calls arrive between back-to-back batches
                continue
            await loop.run_in_executor(self._executor, self._compute_while_ready, runner,
                                       batch, rows)

    def _run(self, runner: ModelRunner, batch: list[_Request], rows: int
             ) -> tuple[float, float, float, list[np.ndarray] | InferenceError]:
        """Run one batch: when it started, its input was assembled and onnxruntime
        returned, and the outputs or the error to answer with."""
        started = time.monotonic()
        inputs = batch[0].inputs if len(batch) == 1 else {
            name: np.concatenate([r.inputs[name] for r in batch]) for name in batch[0].inputs}
        assembled = time.monotonic()
        result: list[np.ndarray] | InferenceError
        try:
            result = runner.run(inputs)
        except Exception as exc:  # onnxruntime errors: fail this batch, keep serving
            log.exception("model %s: batch of %d failed", self.name, rows)
            result = InferenceError(
                f"model {self.name!r} failed on a batch of {rows}: {bounded(str(exc), 300)}")
        return started, assembled, time.monotonic(), result

    def _compute_while_ready(self, runner: ModelRunner, batch: list[_Request],
                             rows: int) -> None:
        """In a compute thread: run `batch` (of `rows`), then each batch that is ready when
        one ends."""
        loop = self._loop
        assert loop is not None, "start() first"
        while batch:
            loop.call_soon_threadsafe(self._finish, batch, rows, *self._run(runner, batch, rows))
            selection = self._take()
            batch, rows = selection.batch, selection.rows
            if selection.expired:
                loop.call_soon_threadsafe(self._fail_expired, selection.expired)

    def _finish(self, batch: list[_Request], size: int, started: float, assembled: float,
                ended: float, result: list[np.ndarray] | InferenceError) -> None:
        """On the loop: answer the batch's requests (`size` rows in all) and record it (its
        run started, its input was assembled, and onnxruntime returned at the times
        given)."""
        tally = self._tally
        waited = [started - request.enqueued for request in batch]
        for seconds in waited:
            tally.queue_wait.observe(seconds)
        if isinstance(result, InferenceError):
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(result)
            return
        compute = ended - started
        recent = self._recent_compute_s.get(size)
        self._recent_compute_s[size] = compute if recent is None else 0.8 * recent + 0.2 * compute
        tally.compute.observe(compute)
        tally.batch_size.observe(size)
        tally.inferences += size
        tally.executions += 1
        offset, answered, splitting = 0, [], time.monotonic()
        whole = len(batch) == 1  # also every request of a model without a batch dimension
        for request, seconds in zip(batch, waited, strict=True):
            if not request.future.done():  # cancelled while computing: nobody to tell
                request.future.set_result(result if whole else [
                    output[offset:offset + request.rows] for output in result])
                answered.append(seconds)
            offset += request.rows
        self._stats.record_batch(size, answered, assembled - started, ended - assembled,
                                 time.monotonic() - splitting)
