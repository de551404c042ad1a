"""The batching policy of a model, and every decision about its queue, as pure logic.

`resolve_policy` is the one place a model's policy is assembled: the model's config.json,
then the server-wide flags, then the model's own entry in the settings. The decisions
take a snapshot of the queue, the clock, the model's measured cost and the arrival rate,
and nothing else, so each rule is tested with a simulated clock; `DynamicBatcher` only
applies their answers. docs/batching.md states the rule on one page.

The `budget` rule (the default):
- A model has a latency budget per request: config.json's `latency_budget_ms`, else the
  server's `--latency-budget-ms`, else derived from its own cost (`derived_budget_s`).
- `CostModel` knows how long a batch of each size takes: measured at warm-up, kept
  current from the batches the model runs.
- `ArrivalRate` knows how many images per second arrive now.
- From those, `target_rows` is the smallest batch that keeps up with the arrivals with
  room to spare. An idle instance runs what is queued as soon as it reaches that size,
  so a lone request in a quiet model runs at once and batches grow with the rate; it
  waits for more only while the oldest request can still be answered within half its
  budget. Whatever queues while every instance is busy forms the next batch.
- `answer_in_s` estimates when a new request would be answered, and `Lateness` how much
  later than such estimates answers have come; past ADMIT_SHARE of the budget the two
  together refuse it at once, rather than serve it late.

The `delay` rule is Triton's dynamic batcher: the oldest request waits up to
`max_queue_delay_us` for a full or preferred batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from contract.repository import ModelConfig
from service.engine.options import EngineOptions

Rule = Literal["budget", "delay"]
Reason = Literal["full", "target", "budget", "delay", "drain"]
"""Why a batch left: it was full (or the next request could not join it); it reached the
size that keeps up with the arrivals (a lone request in a quiet model: a target of 1);
its oldest request could wait no longer within its budget; Triton's delay passed or a
preferred size was reached (`delay` rule); the model is shutting down."""
REASONS: tuple[Reason, ...] = ("full", "target", "budget", "delay", "drain")

WAIT_SHARE = 0.5
"""The share of its budget the oldest request may spend waiting for company; the rest
covers its batch's run, a batch already running, and the transport."""
ADMIT_SHARE = 0.9
"""A request is taken when its estimated answer falls within this share of its budget:
the rest absorbs the estimate's error (runs slower than their average, a batch that
grew while it waited)."""
BUDGET_BATCHES = 4
"""A derived budget holds this many runs of the largest batch: one already running, the
request's own, and two for a burst (a round of closed-loop clients, say) to drain."""
MIN_BUDGET_S = 0.050
"""The least derived budget: an interactive client's patience, and far above a shared
host's scheduling noise."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    """Most rows (images) in one run; also the most one request may hold. 0: the model
    has no batch dimension, and each request runs alone."""
    rule: Rule
    budget_s: float | None
    """The latency budget per request (`budget` rule); None: derived from the model's
    measured cost (`derived_budget_s`)."""
    max_queue_delay_s: float
    """`delay` rule: how long the oldest request may wait for company."""
    preferred_batch_sizes: frozenset[int]
    """`delay` rule: sizes worth running at once when nothing more is queued."""
    max_queue_size: int
    """Requests waiting; beyond it new ones are refused at once."""
    instances: int
    """Sessions, each running its own batches."""

    @property
    def limit(self) -> int:
        """Rows in the largest batch (1 for a model without a batch dimension)."""
        return self.max_batch_size or 1


T = TypeVar("T")


def _first_set(*values: T | None) -> T:
    """The first value that is not None: a later layer wins only where it says something."""
    return next(v for v in values if v is not None)


def resolve_policy(name: str, config: ModelConfig, settings: EngineOptions) -> BatchPolicy:
    """Per-model settings, then server-wide flags, then config.json, then server defaults."""
    over = settings.overrides(name)
    max_batch = _first_set(over.max_batch_size, config.max_batch_size) if config.batched else 0
    preferred = _first_set(over.preferred_batch_sizes, config.preferred_batch_sizes)
    budget_ms = next((v for v in (over.latency_budget_ms, config.latency_budget_ms,
                                  settings.latency_budget_ms) if v is not None), None)
    return BatchPolicy(
        max_batch_size=max_batch,
        rule=_first_set(over.batching, settings.batching),
        budget_s=None if budget_ms is None else budget_ms / 1e3,
        max_queue_delay_s=_first_set(over.max_queue_delay_us, config.max_queue_delay_us) / 1e6,
        preferred_batch_sizes=frozenset(b for b in preferred if b <= max_batch),
        max_queue_size=_first_set(over.max_queue_size, settings.max_queue_size),
        instances=_first_set(over.instances, settings.instances))


class CostModel:
    """Seconds one run takes at each batch size: measured at warm-up, then each size's
    estimate moves a tenth of the way to every run of that size. A size not measured
    yet is interpolated between its measured neighbours (extrapolated at the ends)."""

    SMOOTHING = 0.1

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max(max_rows, 1)
        self._seconds: dict[int, float] = {}

    def observe(self, rows: int, seconds: float) -> None:
        known = self._seconds.get(rows)
        self._seconds[rows] = seconds if known is None else (
            known + self.SMOOTHING * (seconds - known))

    @property
    def measured(self) -> bool:
        return bool(self._seconds)

    def estimates(self) -> dict[int, float]:
        """The current estimate of every size that has one."""
        return dict(sorted(self._seconds.items()))

    def seconds(self, rows: int) -> float:
        """The estimated run time of a batch of `rows`; 0 before anything was measured."""
        known = self._seconds
        if rows in known:
            return known[rows]
        if not known:
            return 0.0
        sizes = sorted(known)
        below = [s for s in sizes if s < rows]
        above = [s for s in sizes if s > rows]
        if below and above:
            a, b = below[-1], above[0]
        elif len(sizes) == 1:
            return known[sizes[0]] * rows / sizes[0]
        else:
            a, b = (sizes[-2], sizes[-1]) if below else (sizes[0], sizes[1])
        slope = (known[b] - known[a]) / (b - a)
        return max(known[a] + slope * (rows - a), 0.0)


class Lateness:
    """How much later than `answer_in_s` estimated a request's answer is ready, on the
    loop: a running estimate of the QUANTILE of that error, moved up a STEP_S share when
    an answer is later than it and down the complementary share when not, so it settles
    where that quantile of answers is later. What the estimate cannot see (runs slower
    than their average while the loop holds the GIL, a compute thread busy with another
    model, a loop slow to take a batch's answers) is learnt from the answers. It stops
    where the caller's task is woken: counting that wake too made a loop flooded by an
    attacker refuse well-behaved clients (docs/results.md)."""

    QUANTILE = 0.99
    STEP_S = 0.002

    def __init__(self) -> None:
        self._seconds = 0.0

    def observe(self, late_s: float) -> None:
        if late_s > self._seconds:
            self._seconds += self.STEP_S * self.QUANTILE
        else:  # never below 0: an estimate that runs early is no licence to admit more
            self._seconds = max(self._seconds - self.STEP_S * (1 - self.QUANTILE), 0.0)

    @property
    def seconds(self) -> float:
        return self._seconds


class ArrivalRate:
    """Rows (images) arriving per second: a moving average of the gaps between arrivals,
    which a silence longer than the average stretches, so a model that went quiet reads
    as quiet at once."""

    SMOOTHING = 0.05

    def __init__(self) -> None:
        self._gap_per_row: float | None = None
        self._last: float | None = None

    def observe(self, now: float, rows: int) -> None:
        if self._last is not None:
            gap = max(now - self._last, 0.0) / rows
            known = self._gap_per_row
            self._gap_per_row = gap if known is None else known + self.SMOOTHING * (gap - known)
        self._last = now

    def per_s(self, now: float) -> float:
        if self._gap_per_row is None or self._last is None:
            return 0.0
        gap = max(self._gap_per_row, now - self._last)
        return math.inf if gap <= 0 else 1.0 / gap


def derived_budget_s(policy: BatchPolicy, cost: CostModel) -> float:
    """A model's budget where none is set: BUDGET_BATCHES runs of its largest batch, or
    MIN_BUDGET_S if that is longer."""
    return max(BUDGET_BATCHES * cost.seconds(policy.limit), MIN_BUDGET_S)


def budget_s(policy: BatchPolicy, cost: CostModel) -> float:
    return policy.budget_s if policy.budget_s is not None else derived_budget_s(policy, cost)


def target_rows(policy: BatchPolicy, cost: CostModel, rows_per_s: float) -> int:
    """The smallest batch with which the model's instances keep up with the arrivals (run
    back to back, they serve `rows_per_s`); the largest batch where none does. Smaller
    batches would fall behind, and waiting for this one costs less than they would;
    while instances are busy, batches grow past it by themselves."""
    limit = policy.limit
    need = rows_per_s / policy.instances
    for rows in range(1, limit + 1):
        seconds = cost.seconds(rows)
        if seconds <= 0 or rows / seconds >= need:
            return rows
    return limit


def answer_in_s(queued_rows: int, rows: int, busy_for_s: float, policy: BatchPolicy,
                cost: CostModel, rows_per_s: float) -> float:
    """How long a request of `rows` would take to be answered if queued now behind
    `queued_rows`, with the first instance free in `busy_for_s` and images arriving at
    `rows_per_s`: the full batches ahead of it, shared among the instances, then its own,
    which those arriving meanwhile join."""
    limit = policy.limit
    rounds = queued_rows // limit // policy.instances
    starts_in = busy_for_s + rounds * cost.seconds(limit)
    own = min(queued_rows % limit + rows + math.ceil(rows_per_s * starts_in), limit)
    return starts_in + cost.seconds(own)


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
    """When no batch is ready: when to decide again if nothing arrives (the head's last
    moment to leave, or the first deadline, whichever is sooner); None when there is
    nothing to wait for."""
    rows: int = 0
    """Rows (images) in `batch`."""
    reason: Reason | None = None
    """Why `batch` left (None when it is empty)."""


def select_batch(queue: Iterable[Q], now: float, policy: BatchPolicy, cost: CostModel,
                 rows_per_s: float, drain: bool = False) -> Selection[Q]:
    """Decide what leaves the queue at `now`, for a model instance that is idle (the
    batcher asks only then), the arrivals running at `rows_per_s`.

    A batch is the longest run of requests from the head whose rows fit the model's
    largest batch and whose shapes equal the head's. It leaves when it is full (or the
    next request cannot join it), or when draining; then by the rule:
    - budget: when it reaches `target_rows`, or when its oldest request has spent
      WAIT_SHARE of its budget less the batch's own run;
    - delay: when it is a preferred size and nothing else waits, or when its oldest
      request has waited `max_queue_delay_s`.
    Cancelled requests are dropped wherever they sit; expired ones removed.
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
    taken, rows, limit, shapes = 0, 0, policy.limit, alive[0].shapes
    for request in alive:
        if rows + request.rows > limit or request.shapes != shapes:
            break
        taken, rows = taken + 1, rows + request.rows
    head = alive[0].enqueued
    reason: Reason | None = None
    if rows == limit or taken < len(alive):
        reason = "full"
    elif drain:
        reason = "drain"
    elif policy.rule == "budget":
        if rows >= target_rows(policy, cost, rows_per_s):
            reason = "target"
        else:
            leave_at = head + WAIT_SHARE * budget_s(policy, cost) - cost.seconds(rows)
            if now >= leave_at:
                reason = "budget"
    else:
        leave_at = head + policy.max_queue_delay_s
        if rows in policy.preferred_batch_sizes or now >= leave_at:
            reason = "delay"
    if reason is not None:
        return Selection(alive[:taken], expired, alive[taken:], None, rows, reason)
    # Less than one batch is queued, so this scan is short.
    wake = min([leave_at, *(r.deadline for r in alive if r.deadline is not None)])
    return Selection([], expired, alive, wake)
