"""Dynamic batching: concurrent requests for one model are run as one batch.

What leaves the queue and when is decided by `batching.select_batch`, and whether a
request is taken at all by `batching.answer_in_s` against the model's budget; this
module applies their answers. The cost model they read starts from the warm-up's timings
and learns from every batch run; the arrival rate from every request.

Each instance has a worker task on the event loop and runs its batches in a compute
thread, so the loop goes on accepting calls while the model runs, and the requests that
arrive meanwhile form the next batch. When a batch ends, the compute thread decides at
once whether the next is ready and, if so, runs it: a busy model does not idle while
the loop gets round to it. The queue, the cost model and the rate are shared with those
threads under one lock; futures are only ever resolved on the loop.

One fast path: the request of a lone caller (no other call in progress, so nobody could
join its batch), on a model whose every instance is idle, runs in its caller's step when
the cost model says its run takes less than handing it to a compute thread and back
does (measured on the batches that made that trip). That is a LeNet-sized model on a
CPU, where the trip costs more than the run; never a GPU's run, which waits on the
device. Under load, requests queue and batch as usual.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.engine.batching import (
    ADMIT_SHARE,
    ArrivalRate,
    BatchPolicy,
    CostModel,
    Lateness,
    Selection,
    answer_in_s,
    budget_s,
    select_batch,
    target_rows,
)
from service.engine.runtime import Runner, Tensors
from service.observability.metrics import Metrics, ModelStats
from service.status import ServingError, Status, bounded

log = logging.getLogger(__name__)
PUBLISH_EVERY_S = 1.0
"""How often the budget and cost gauges are refreshed: metrics are flushed each second,
so copying the estimates after every batch would only cost the event loop."""


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
    promised: float | None = None
    """When admission estimated it would be answered (the budget rule)."""

    @property
    def cancelled(self) -> bool:
        return self.future.done()


@dataclass(slots=True)
class _Ran:
    """One batch's run, handed from its compute thread to the loop."""

    batch: list[_Request]
    rows: int
    reason: str
    started: float
    assembled: float
    ended: float
    result: list[np.ndarray] | ServingError
    dispatched: float | None = None
    """When the loop handed it to a compute thread; None for a batch the thread took
    itself after another (no trip to time)."""


class DynamicBatcher:
    def __init__(self, name: str, runners: Sequence[Runner], executor: Executor,
                 policy: BatchPolicy, metrics: Metrics, stats: ModelStats,
                 version: str = "1", warmed: Mapping[int, float] | None = None) -> None:
        """`warmed`: seconds per batch size as the warm-up timed them."""
        self.name = name
        self.policy = policy
        self._runners = list(runners)
        self._executor = executor
        self._stats = stats
        self._tally = metrics.model(name, version)
        config = self._runners[0].config if self._runners else None
        self._varying = config is not None and any(-1 in t.shape for t in config.inputs)
        """Requests may differ in shape past the batch dimension: only equal ones batch."""
        self.cost = CostModel(policy.limit)
        for rows, seconds in (warmed or {}).items():
            self.cost.observe(rows, seconds)
        self.rate = ArrivalRate()
        self._queue: deque[_Request] = deque()
        self._lock = threading.Lock()
        """Guards the queue, the cost model, the rate and `_busy_until`: the loop adds
        requests, compute threads take batches and record their runs."""
        self._queued_rows = 0
        self._busy_until = [0.0] * len(self._runners)
        """Per instance: when its running batch should end; 0 while it is idle."""
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sleeping = 0
        """Workers waiting for `_arrived`: none computing, and none with a batch ready."""
        self._inline = bool(self._runners) and all(r.host_compute for r in self._runners)
        self._published_at = 0.0
        self._trip_s: float | None = None
        """A moving average of the round trip to a compute thread and back: from the
        loop's hand-off to the run's start, and from its end to the loop's answer."""
        self.lateness = Lateness()
        """How much later than promised answers are ready; on the loop only."""
        self._publish_cost()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._workers = [asyncio.create_task(self._work(i, runner),
                                             name=f"batcher-{self.name}-{i}")
                         for i, runner in enumerate(self._runners)]

    @property
    def budget_s(self) -> float | None:
        """The latency budget now; None under the delay rule."""
        if self.policy.rule != "budget":
            return None
        with self._lock:
            return budget_s(self.policy, self.cost)

    async def infer(self, inputs: Tensors, rows: int | None = None,
                    enqueued: float | None = None, deadline: float | None = None,
                    alone: bool = False) -> list[np.ndarray]:
        """The model's outputs for `inputs` (`rows` of them, first in each input if the
        model batches; by default the first input's length), in its configured order.

        `enqueued` is `time.monotonic()` when the call arrived (default now): its wait
        for company counts from then, and the queue-wait metrics. `deadline` an instant
        on the same clock: a request still queued
        then fails DEADLINE_EXCEEDED. Cancelling the caller removes the request before it
        reaches the model. `alone`: no other call is in progress in the server, so none
        could join this request's batch (the fast path's condition). The caller has
        checked `rows` against the policy; a larger one is a programming error.
        """
        if self._closing:
            raise BatcherClosedError(self.name)
        policy = self.policy
        if rows is None:
            rows = len(next(iter(inputs.values()))) if policy.max_batch_size else 1
        if not 1 <= rows <= policy.limit:
            raise ValueError(f"expected 1 to {policy.limit} rows per request for model "
                             f"{self.name!r}, got {rows}")
        now = time.monotonic()
        shapes = tuple(a.shape[1:] for a in inputs.values()) if self._varying else None
        future: asyncio.Future[list[np.ndarray]] = self._loop.create_future()  # type: ignore[union-attr]
        request = _Request(inputs, rows, shapes, future, now if enqueued is None else enqueued,
                           deadline)
        with self._lock:
            self.rate.observe(now, rows)
            inline = alone and self._inline and self._runs_inline(rows, now)
            if not inline:
                if len(self._queue) >= policy.max_queue_size:
                    raise ServingError(Status.RESOURCE_EXHAUSTED,
                                       f"model {self.name!r} has {len(self._queue)} requests "
                                       f"queued (limit {policy.max_queue_size}); retry later")
                if policy.rule == "budget":
                    self._check_budget(request, now)
                self._queue.append(request)
                self._queued_rows += rows
        if inline:
            return self._run_inline(inputs, rows, request.enqueued)
        self._settle_depth()
        if self._sleeping:
            self._arrived.set()
        return await future

    def _runs_inline(self, rows: int, now: float) -> bool:
        """Under the lock: a batch of its own, leaving at once, on an idle model, cheaper
        than the trip."""
        trip = self._trip_s
        return (trip is not None and not self._queue
                and self._sleeping == len(self._runners) and self.policy.rule == "budget"
                and self.cost.seconds(rows) < trip
                and rows >= target_rows(self.policy, self.cost, self.rate.per_s(now)))

    def _run_inline(self, inputs: Tensors, rows: int, enqueued: float) -> list[np.ndarray]:
        started = time.monotonic()
        try:
            result: list[np.ndarray] | ServingError = self._runners[0].run(inputs)
        except Exception as exc:  # onnxruntime errors: fail this request, keep serving
            log.exception("model %s: a request of %d failed", self.name, rows)
            result = ServingError(Status.INTERNAL, f"model {self.name!r} failed on a batch "
                                  f"of {rows}: {bounded(str(exc), 300)}")
        ended = time.monotonic()
        if not isinstance(result, ServingError):
            with self._lock:
                self.cost.observe(rows, ended - started)
        self._record(_Ran([], rows, "target", started, started, ended, result),
                     [started - enqueued], 0.0)
        if isinstance(result, ServingError):
            raise result
        return result

    def _check_budget(self, request: _Request, now: float) -> None:
        """Under the lock: refuse `request` now if the queue ahead of it cannot be served
        within its budget, which runs from its arrival here (images decoded before it
        were the client's own choice of work), with the margin learnt from answers that
        came later than estimated."""
        busy = self._busy_until
        idle = min(busy) == 0.0
        free_in = 0.0 if idle else max(min(busy) - now, 0.0)
        budget = budget_s(self.policy, self.cost)
        answer = answer_in_s(self._queued_rows, request.rows, free_in, self.policy, self.cost,
                             self.rate.per_s(now))
        request.promised = now + answer
        # The margin is learnt from answers, so it is current only while they flow: an
        # idle model runs this request at once and learns afresh.
        margin = 0.0 if idle and not self._queued_rows else self.lateness.seconds
        answer += margin
        if answer > ADMIT_SHARE * budget:
            self._tally.refused += 1
            raise ServingError(
                Status.RESOURCE_EXHAUSTED,
                f"model {self.name!r} cannot answer within its latency budget of "
                f"{budget * 1e3:.1f} ms: {self._queued_rows} images queued ahead, about "
                f"{answer * 1e3:.1f} ms to answer ({margin * 1e3:.1f} ms of it because "
                f"answers came that much later than estimated); retry later")

    async def close(self) -> None:
        """Run everything already queued, then stop the workers."""
        self._closing = True
        self._arrived.set()
        await asyncio.gather(*self._workers)

    def _take(self) -> Selection[_Request]:
        """Under the lock, from the loop or a compute thread: apply `select_batch`."""
        now = time.monotonic()
        selection = select_batch(self._queue, now, self.policy, self.cost,
                                 self.rate.per_s(now), self._closing)
        removed = len(self._queue) - len(selection.waiting)
        if removed:
            self._queue = deque(selection.waiting)
            self._queued_rows = sum(r.rows for r in selection.waiting)
        return selection

    def _fail_expired(self, expired: list[_Request]) -> None:
        now = time.monotonic()
        for request in expired:
            if not request.future.done():
                request.future.set_exception(ServingError(
                    Status.DEADLINE_EXCEEDED,
                    f"deadline passed after {now - request.enqueued:.3f}s in the queue of "
                    f"model {self.name!r}, before compute"))

    async def _next_batch(self, index: int) -> Selection[_Request] | None:
        while True:
            with self._lock:
                selection = self._take()
                if selection.batch:
                    self._busy_until[index] = time.monotonic() + self.cost.seconds(
                        selection.rows)
            self._settle_depth()
            self._fail_expired(selection.expired)
            if selection.batch:
                return selection
            self._arrived.clear()
            wake = selection.wake_at
            if wake is None and self._closing:
                return None
            # Sleep until a request arrives, or the head's last moment to leave or the
            # first deadline passes. loop.time() is time.monotonic(): one timer.
            timer = None if wake is None else asyncio.get_running_loop().call_at(
                wake, self._arrived.set)
            self._sleeping += 1
            try:
                await self._arrived.wait()
            finally:
                self._sleeping -= 1
                if timer is not None:
                    timer.cancel()

    def _settle_depth(self) -> None:
        """On the loop: the depth gauge from the queue as it is now."""
        self._tally.depth = len(self._queue)

    async def _work(self, index: int, runner: Runner) -> None:
        loop = asyncio.get_running_loop()
        while (selection := await self._next_batch(index)) is not None:
            await loop.run_in_executor(self._executor, self._compute_while_ready, index,
                                       runner, selection, time.monotonic())
            # Not held while this worker waits for the next batch: its inputs (a client's
            # CUDA shared memory region among them) are let go once it is answered.
            del selection

    def _compute_while_ready(self, index: int, runner: Runner,
                             selection: Selection[_Request], dispatched: float) -> None:
        """In a compute thread: run `selection`'s batch (handed over at `dispatched`),
        then each batch that is ready when one ends."""
        loop = self._loop
        assert loop is not None, "start() first"
        handed: float | None = dispatched
        while selection.batch:
            batch, rows, reason = selection.batch, selection.rows, selection.reason or "full"
            started = assembled = time.monotonic()
            result: list[np.ndarray] | ServingError
            try:  # rows left in CUDA shared memory are copied out as the batch is made
                inputs = batch[0].inputs if len(batch) == 1 else {
                    name: np.concatenate([r.inputs[name] for r in batch])
                    for name in batch[0].inputs}
                assembled = time.monotonic()
                result = runner.run(inputs)
            except Exception as exc:  # onnxruntime errors: fail this batch, keep serving
                log.exception("model %s: batch of %d failed", self.name, rows)
                result = ServingError(Status.INTERNAL, f"model {self.name!r} failed on a "
                                      f"batch of {rows}: {bounded(str(exc), 300)}")
            ended = time.monotonic()
            with self._lock:
                if not isinstance(result, ServingError):
                    self.cost.observe(rows, ended - assembled)
                selection = self._take()
                self._busy_until[index] = (ended + self.cost.seconds(selection.rows)
                                           if selection.batch else 0.0)
            loop.call_soon_threadsafe(self._finish, _Ran(batch, rows, reason, started,
                                                         assembled, ended, result, handed),
                                      selection.expired)
            handed = None

    def _finish(self, ran: _Ran, expired: list[_Request]) -> None:
        """On the loop: answer the batch's requests and record it."""
        splitting = time.monotonic()
        if ran.dispatched is not None:
            trip = (ran.started - ran.dispatched) + (splitting - ran.ended)
            known = self._trip_s
            self._trip_s = trip if known is None else known + 0.1 * (trip - known)
        answered = []  # how long each request still awaited waited in the queue
        result = ran.result
        error, outputs = (result, []) if isinstance(result, ServingError) else (None, result)
        whole = len(ran.batch) == 1  # also every request of a model without a batch dimension
        offset = 0
        for request in ran.batch:
            future = request.future
            if not future.done():  # cancelled while computing: nobody to tell
                if error is not None:
                    future.set_exception(error)
                elif whole:
                    future.set_result(outputs)
                else:
                    future.set_result([output[offset:offset + request.rows]
                                       for output in outputs])
                answered.append(ran.started - request.enqueued)
                if request.promised is not None:
                    self.lateness.observe(splitting - request.promised)
            offset += request.rows
        self._fail_expired(expired)
        self._settle_depth()
        self._record(ran, answered, time.monotonic() - splitting)

    def _record(self, ran: _Ran, answered: Sequence[float], output_s: float) -> None:
        """One run in the metrics and, if it succeeded, in Triton's statistics
        (`answered`: how long each request it answered waited in the queue)."""
        tally = self._tally
        for seconds in answered:
            tally.queue_wait.observe(seconds)
        if isinstance(ran.result, ServingError):
            return
        tally.compute.observe(ran.ended - ran.started)
        tally.batch_size.observe(ran.rows)
        tally.inferences += ran.rows
        tally.executions += 1
        tally.reasons[ran.reason] += 1
        if ran.ended - self._published_at >= PUBLISH_EVERY_S:
            self._publish_cost()
        self._stats.record_batch(ran.rows, answered, ran.assembled - ran.started,
                                 ran.ended - ran.assembled, output_s)

    def _publish_cost(self) -> None:
        """The budget and the cost model's estimates, into the tally's gauges."""
        self._published_at = time.monotonic()
        with self._lock:
            self._tally.cost_s = self.cost.estimates()
            self._tally.budget_s = (budget_s(self.policy, self.cost)
                                    if self.policy.rule == "budget" else 0.0)
        self._tally.lateness_s = self.lateness.seconds
