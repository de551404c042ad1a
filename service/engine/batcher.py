"""Dynamic batching: concurrent requests for one model are run as one onnxruntime batch.

What leaves the queue and when is decided by `batching.select_batch` (the policy's
rules); this module applies it. Where the compute runs:

- A lone caller's request (no other call in progress, every instance idle, a size that
  recently ran faster than `policy.inline_compute_s`) runs in the caller's own step:
  `submit` returns its outputs. No queue, no worker to wake, no future, no thread: for a
  LeNet-sized model those cost more than the run. Only with `work_conserving`: Triton's
  delay policy makes every request wait for company.
- Everything else waits in the queue and runs in a compute thread, one per instance, so
  the event loop goes on accepting calls while the model runs and the requests that
  arrive meanwhile form the next batch. When a batch ends and the next is ready, the
  compute thread takes and runs it at once: a busy model never idles while the loop gets
  round to it. After a batch, the thread first waits (up to the model's
  `max_queue_delay_s`, or the batch's own compute time if longer, up to four delays)
  until the callers it answered are queued again beside those that queued while it ran,
  or a full batch: they are on their way back, so a round of callers runs as one batch
  rather than splitting into stragglers. A lone caller never waits. The queue is shared
  with those threads under a lock; futures are only ever resolved on the loop.

`submit` is synchronous, so a caller can answer without a task of its own (a stream's
requests); `infer` awaits it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.engine.batching import BatchPolicy, Selection, select_batch
from service.engine.runtime import ModelRunner, Tensors
from service.observability.metrics import Metrics, ModelStats
from service.status import ServingError, Status, bounded

log = logging.getLogger(__name__)
COMPANY_WAIT_DELAYS = 4
"""The longest wait for a round of callers, in `max_queue_delay_s`: on 2 busy cores a
round of 16-32 AlexNet callers takes 5-8 ms to come back (docs/results.md)."""


class BatcherClosedError(ServingError):
    """The model version is shutting down (a hot reload retired it): the version now
    served may take the request instead."""

    def __init__(self, name: str) -> None:
        super().__init__(Status.UNAVAILABLE, f"model {name!r} is shutting down")


@dataclass(eq=False, slots=True)
class _Request:
    inputs: Tensors
    rows: int
    shapes: object
    """Its inputs' shapes past the batch dimension, where the model takes dims of any
    size (None where every request's are the same)."""
    future: asyncio.Future[list[np.ndarray]]
    enqueued: float
    deadline: float | None
    then: Callable[[], None] | None
    """Called on the loop once `future` holds the answer (not if it was cancelled)."""

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
        config = self._runners[0].config if self._runners else None
        self._varying = config is not None and any(-1 in t.shape for t in config.inputs)
        """Requests may differ in shape past the batch dimension: only equal ones batch."""
        self._queue: deque[_Request] = deque()
        self._lock = threading.Lock()  # guards _queue: the loop adds, compute threads take
        self._company = threading.Condition(self._lock)
        self._queued_rows = 0
        self._callers_wanted = 0
        """Nonzero while a compute thread waits for this many requests to be queued."""
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sleeping = 0
        """Workers waiting for `_arrived`: none computing, and none with a batch ready."""
        self._recent_compute_s: dict[int, float] = {}
        """Per batch size: a moving average of its compute time."""

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._workers = [asyncio.create_task(self._work(runner), name=f"batcher-{self.name}-{i}")
                         for i, runner in enumerate(self._runners)]

    @property
    def idle_instances(self) -> int:
        """Instances waiting for a request: nothing queued, nothing of theirs running."""
        return 0 if self._queue else self._sleeping

    def submit(self, inputs: Tensors, rows: int, now: float, deadline: float | None = None,
               alone: bool = False, then: Callable[[], None] | None = None
               ) -> list[np.ndarray] | asyncio.Future[list[np.ndarray]]:
        """The model's outputs for `inputs` (`rows` of them, first in each input if the
        model batches), in its configured order: at once for a lone caller (see the
        module's doc), else a future that the batch's run resolves.

        `now` is `time.monotonic()` as the caller read it; `deadline` an instant on the
        same clock: a request still queued then fails DEADLINE_EXCEEDED. Cancelling the
        future removes the request before it reaches the model. `alone`: no other call
        is in progress, so none would join this request's batch. `then`: called on the
        loop as soon as the future holds the answer, in the batch's own callback, rather
        than scheduled as a callback of the future's (a step per request saved for a
        caller that awaits nothing). The caller has checked `rows` against the policy; a
        larger one is a programming error.
        """
        if self._closing:
            raise BatcherClosedError(self.name)
        policy = self.policy
        if not 1 <= rows <= (policy.max_batch_size or 1):
            raise ValueError(f"expected 1 to {policy.max_batch_size} rows per request for "
                             f"model {self.name!r}, got {rows}")
        if (alone and policy.work_conserving and self._sleeping == len(self._runners)
                and not self._queue):
            recent = self._recent_compute_s.get(rows)
            if recent is not None and recent < policy.inline_compute_s:
                return self._run_alone(inputs, rows, now)
        shapes = tuple(a.shape[1:] for a in inputs.values()) if self._varying else None
        future: asyncio.Future[list[np.ndarray]] = self._loop.create_future()  # type: ignore[union-attr]
        request = _Request(inputs, rows, shapes, future, now, deadline, then)
        with self._lock:
            if len(self._queue) >= policy.max_queue_size:
                raise ServingError(Status.RESOURCE_EXHAUSTED,
                                   f"model {self.name!r} has {len(self._queue)} requests "
                                   f"queued (limit {policy.max_queue_size}); retry later")
            self._queue.append(request)
            self._queued_rows += rows
            self._tally.depth += 1
            if self._callers_wanted and self._has_company(self._callers_wanted):
                self._company.notify()
        if self._sleeping:
            self._arrived.set()
        return future

    async def infer(self, inputs: Tensors, deadline: float | None = None,
                    alone: bool = False) -> list[np.ndarray]:
        """`submit`, awaited (in-process callers)."""
        first = next(iter(inputs.values()))
        rows = len(first) if self.policy.max_batch_size else 1
        answer = self.submit(inputs, rows, time.monotonic(), deadline, alone)
        return answer if isinstance(answer, list) else await answer

    def _run_alone(self, inputs: Tensors, rows: int, now: float) -> list[np.ndarray]:
        """Run one request in its caller's step, recorded as a batch of its own."""
        assembled, ended, result = self._run(self._runners[0], inputs, rows, lone=True)
        self._record(rows, (0.0,), now, assembled, ended, 0.0, result)
        if isinstance(result, ServingError):
            raise result
        return result

    async def close(self) -> None:
        """Run everything already queued, then stop the workers."""
        self._closing = True
        self._arrived.set()
        with self._lock:
            self._company.notify_all()
        await asyncio.gather(*self._workers)

    def _take(self) -> Selection[_Request]:
        """From the loop or a compute thread: apply `select_batch` to the queue."""
        with self._lock:
            selection = select_batch(self._queue, time.monotonic(), self.policy, self._closing)
            removed = len(self._queue) - len(selection.waiting)
            if removed:
                self._queue = deque(selection.waiting)
                self._queued_rows = sum(r.rows for r in selection.waiting)
                self._tally.depth -= removed
        return selection

    def _fail_expired(self, expired: list[_Request]) -> None:
        now = time.monotonic()
        for request in expired:
            if not request.future.done():
                request.future.set_exception(ServingError(
                    Status.DEADLINE_EXCEEDED,
                    f"deadline passed after {now - request.enqueued:.3f}s in the queue of "
                    f"model {self.name!r}, before compute"))
                if request.then is not None:
                    self._tell(request.then)

    async def _next_batch(self) -> Selection[_Request] | None:
        while True:
            selection = self._take()
            self._fail_expired(selection.expired)
            if selection.batch:
                return selection
            self._arrived.clear()
            wake = selection.wake_at
            if wake is None and self._closing:
                return None
            # Sleep until a request arrives, or the head's delay is over or the first
            # deadline passes (so an expired request is failed then, not when its batch
            # forms). loop.time() is time.monotonic(): one timer, not a wait_for task.
            timer = None if wake is None else asyncio.get_running_loop().call_at(
                wake, self._arrived.set)
            self._sleeping += 1
            try:
                await self._arrived.wait()
            finally:
                self._sleeping -= 1
                if timer is not None:
                    timer.cancel()

    async def _work(self, runner: ModelRunner) -> None:
        loop = asyncio.get_running_loop()
        while (selection := await self._next_batch()) is not None:
            await loop.run_in_executor(self._executor, self._compute_while_ready, runner,
                                       selection.batch, selection.rows)

    def _run(self, runner: ModelRunner, inputs: Tensors, rows: int, lone: bool = False
             ) -> tuple[float, float, list[np.ndarray] | ServingError]:
        """Run one batch (`lone`: a lone caller's request): when its input was assembled
        and onnxruntime returned, and the outputs or the error to answer with."""
        assembled = time.monotonic()
        result: list[np.ndarray] | ServingError
        try:
            result = runner.run(inputs, lone)
        except Exception as exc:  # onnxruntime errors: fail this batch, keep serving
            log.exception("model %s: batch of %d failed", self.name, rows)
            result = ServingError(Status.INTERNAL, f"model {self.name!r} failed on a batch "
                                  f"of {rows}: {bounded(str(exc), 300)}")
        return assembled, time.monotonic(), result

    def _compute_while_ready(self, runner: ModelRunner, batch: list[_Request],
                             rows: int) -> None:
        """In a compute thread: run `batch` (of `rows`), then each batch that is ready when
        one ends."""
        loop = self._loop
        assert loop is not None, "start() first"
        while batch:
            started = time.monotonic()
            inputs = batch[0].inputs if len(batch) == 1 else {
                name: np.concatenate([r.inputs[name] for r in batch]) for name in batch[0].inputs}
            assembled, ended, result = self._run(runner, inputs, rows)
            loop.call_soon_threadsafe(self._finish, batch, rows, started, assembled, ended,
                                      result)
            self._await_company(len(batch), assembled, ended)
            selection = self._take()
            batch, rows = selection.batch, selection.rows
            if selection.expired:
                loop.call_soon_threadsafe(self._fail_expired, selection.expired)

    def _await_company(self, answered: int, assembled: float, ended: float) -> None:
        """In a compute thread, after a batch that answered `answered` requests and
        computed from `assembled` to `ended`: wait until they are queued again beside
        what queued while it ran, or a full batch, so this round's callers run as one
        batch (work-conserving only: `delay` has its own rule). The wait lasts at most the
        model's `max_queue_delay_s` or the batch's own compute time, whichever is longer,
        and never more than COMPANY_WAIT_DELAYS delays: a model whose batches take longer
        than the delay gets its rounds whole, waiting never idles a busy model more than
        half the time, and a caller that does not come back costs its round a bounded
        wait. A lone caller never waits: after a batch of one request, one that arrived
        after it ended is that caller back already, not company. After a larger batch
        every queued request counts, those back already too, so a busy round waits (up
        to its bound) for a fuller batch, which served LeNet at 32 clients better than
        counting each caller once (docs/results.md)."""
        if not self.policy.work_conserving:
            return
        delay = self.policy.max_queue_delay_s
        deadline = time.monotonic() + max(delay, min(ended - assembled,
                                                      COMPANY_WAIT_DELAYS * delay))
        with self._lock:
            queue = self._queue
            callers = answered + (len(queue) if answered > 1
                                  else sum(r.enqueued < ended for r in queue))
            if callers <= 1 or self._has_company(callers):
                return
            self._callers_wanted = callers
            try:
                while not self._has_company(callers) and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._company.wait(left)
            finally:
                self._callers_wanted = 0

    def _has_company(self, callers: int) -> bool:
        """Under the lock: `callers` requests are queued, or a full batch."""
        return (len(self._queue) >= callers
                or self._queued_rows >= (self.policy.max_batch_size or 1))

    def _finish(self, batch: list[_Request], rows: int, started: float, assembled: float,
                ended: float, result: list[np.ndarray] | ServingError) -> None:
        """On the loop: answer the batch's requests (`rows` in all) and record it."""
        splitting = time.monotonic()
        answered = []  # how long each request still awaited waited in the queue
        error, outputs = (result, []) if isinstance(result, ServingError) else (None, result)
        whole = len(batch) == 1  # also every request of a model without a batch dimension
        offset = 0
        for request in batch:
            future = request.future
            if not future.done():  # cancelled while computing: nobody to tell
                if error is not None:
                    future.set_exception(error)
                elif whole:
                    future.set_result(outputs)
                else:
                    future.set_result([output[offset:offset + request.rows]
                                       for output in outputs])
                answered.append(started - request.enqueued)
                if request.then is not None:
                    self._tell(request.then)
            offset += request.rows
        self._record(rows, answered, started, assembled, ended, time.monotonic() - splitting,
                     result)

    def _tell(self, then: Callable[[], None]) -> None:
        """A caller's `then`: one that fails costs the batch's other callers nothing."""
        try:
            then()
        except Exception:
            log.exception("model %s: a request's answer could not be handed over", self.name)

    def _record(self, rows: int, answered: Sequence[float], started: float, assembled: float,
                ended: float, output_s: float, result: list[np.ndarray] | ServingError
                ) -> None:
        """One run in the metrics and, if it succeeded, in Triton's statistics
        (`answered`: how long each request it answered waited in the queue)."""
        tally = self._tally
        for seconds in answered:
            tally.queue_wait.observe(seconds)
        if isinstance(result, ServingError):
            return
        compute = ended - started
        recent = self._recent_compute_s.get(rows)
        self._recent_compute_s[rows] = compute if recent is None else 0.8 * recent + 0.2 * compute
        tally.compute.observe(compute)
        tally.batch_size.observe(rows)
        tally.inferences += rows
        tally.executions += 1
        self._stats.record_batch(rows, answered, assembled - started, ended - assembled,
                                 output_s)
