"""The batching policy of a model, and the decision of what to run next, as pure logic.

`resolve_policy` is the one place a model's policy is assembled: the model's config.json,
then the server-wide flags, then the model's own entry in the settings. `select_batch`
decides from a snapshot of the queue and the clock alone, so every batching rule is
unit-tested in milliseconds; `DynamicBatcher` only applies its answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from contract.repository import ModelConfig
from service.engine.options import EngineOptions


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    """Most rows (images) in one onnxruntime run; also the most one request may hold. 0:
    the model has no batch dimension, and each request runs alone."""
    max_queue_delay_s: float
    """How long the oldest queued request may wait for company before its batch runs."""
    preferred_batch_sizes: frozenset[int]
    """Sizes worth running at once when nothing more is queued (each <= max_batch_size)."""
    max_queue_size: int
    """Requests waiting; beyond it new ones are refused at once."""
    instances: int
    """onnxruntime sessions, each running its own batches."""
    work_conserving: bool = False
    """An idle instance runs what is queued at once; requests batch while instances are
    busy. False: Triton's rule, the head waits up to max_queue_delay_s for company."""
    inline_compute_s: float = 0.0
    """A lone caller's request of a size that recently ran faster than this runs in the
    caller's step on the event loop (work-conserving only); everything queued runs in a
    compute thread."""


T = TypeVar("T")


def _first_set(*values: T | None) -> T:
    """The first value that is not None: a later layer wins only where it says something."""
    return next(v for v in values if v is not None)


def resolve_policy(name: str, config: ModelConfig, settings: EngineOptions) -> BatchPolicy:
    """Per-model settings, then server-wide flags, then config.json, then server defaults."""
    over = settings.overrides(name)
    max_batch = _first_set(over.max_batch_size, config.max_batch_size) if config.batched else 0
    preferred = _first_set(over.preferred_batch_sizes, config.preferred_batch_sizes)
    return BatchPolicy(
        max_batch_size=max_batch,
        max_queue_delay_s=_first_set(over.max_queue_delay_us, config.max_queue_delay_us) / 1e6,
        preferred_batch_sizes=frozenset(b for b in preferred if b <= max_batch),
        max_queue_size=_first_set(over.max_queue_size, settings.max_queue_size),
        instances=_first_set(over.instances, settings.instances),
        work_conserving=_first_set(over.batching, settings.batching) == "work-conserving",
        inline_compute_s=settings.inline_compute_us / 1e6)


class Queued(Protocol):
    """What selection needs to know of a queued request."""

    @property
    def rows(self) -> int: ...
    @property
    def enqueued(self) -> float: ...
    @property
    def deadline(self) -> float | None: ...
    @property
    def cancelled(self) -> bool: ...
    @property
    def shapes(self) -> object:
        """Requests batch together only if these are equal (their inputs' shapes past the
        batch dimension; they differ only where a model takes dims of any size)."""


Q = TypeVar("Q", bound=Queued)


@dataclass(frozen=True)
class Selection(Generic[Q]):
    batch: list[Q]
    """Run these now, in arrival order; empty when no batch is ready."""
    expired: list[Q]
    """Past their deadline before compute: fail them."""
    waiting: list[Q]
    """The queue after this decision (cancelled requests dropped), in arrival order."""
    wake_at: float | None
    """When no batch is ready: when to decide again if nothing arrives (the head's delay
    or the first deadline, whichever is sooner); None when there is nothing to wait for."""
    rows: int = 0
    """Rows (images) in `batch`."""


def select_batch(queue: Iterable[Q], now: float, policy: BatchPolicy, drain: bool = False
                 ) -> Selection[Q]:
    """Decide what leaves the queue at `now`, for a model instance that is idle (the
    batcher asks only then).

    A batch is the longest run of requests from the head whose rows fit `max_batch_size`
    (1 for a model without a batch dimension) and whose shapes equal the head's. It leaves
    at once under a work-conserving policy or when draining; otherwise when it is full (or
    the next request cannot join it), when it is a preferred size and nothing else waits,
    or when its head has waited `max_queue_delay_s`. Cancelled requests are dropped
    wherever they sit; expired ones removed.
    """
    alive: list[Q] = []
    expired: list[Q] = []
    for request in queue:
        if request.cancelled:
            continue
        if request.deadline is not None and now >= request.deadline:
            expired.append(request)
        else:
            alive.append(request)
    if not alive:
        return Selection([], expired, [], None)
    taken, rows, limit, shapes = 0, 0, policy.max_batch_size or 1, alive[0].shapes
    for request in alive:
        if rows + request.rows > limit or request.shapes != shapes:
            break
        taken, rows = taken + 1, rows + request.rows
    head = alive[0].enqueued
    full = rows == limit or taken < len(alive)
    preferred = rows in policy.preferred_batch_sizes and taken == len(alive)
    if (policy.work_conserving or full or preferred or drain
            or now - head >= policy.max_queue_delay_s):
        return Selection(alive[:taken], expired, alive[taken:], None, rows)
    # Less than one batch is queued, so this scan is short.
    wake = min([head + policy.max_queue_delay_s,
                *(r.deadline for r in alive if r.deadline is not None)])
    return Selection([], expired, alive, wake)
