"""The batching policy as pure functions on a simulated clock: every rule, and the budget
rule under seeded Poisson arrivals, in milliseconds."""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from contract.repository import ModelConfig, TensorSpec
from service.engine.batching import (
    ADMIT_SHARE,
    BUDGET_BATCHES,
    MIN_BUDGET_S,
    ArrivalRate,
    BatchPolicy,
    CostModel,
    Lateness,
    answer_in_s,
    budget_s,
    derived_budget_s,
    resolve_policy,
    select_batch,
    target_rows,
)
from service.engine.options import EngineOptions, ModelOverrides

POLICY = BatchPolicy(max_batch_size=8, rule="delay", budget_s=None, max_queue_delay_s=0.010,
                     preferred_batch_sizes=frozenset({4}), max_queue_size=100, instances=1)
UNMEASURED = CostModel(8)


@dataclass(frozen=True)
class Q:
    name: str
    rows: int = 1
    enqueued: float = 0.0
    deadline: float | None = None
    cancelled: bool = False
    shapes: tuple[int, ...] = (1, 28, 28)


def names(requests: list[Q]) -> list[str]:
    return [r.name for r in requests]


# (case, queue, now, drain, batch, expired, waiting, wake_at)
CASES = [
    ("empty queue: nothing to wait for", [], 1.0, False, [], [], [], None),
    ("one request waits for company until its delay is over",
     [Q("a")], 0.004, False, [], [], ["a"], 0.010),
    ("the head's delay is over: whatever is queued runs",
     [Q("a"), Q("b", enqueued=0.005)], 0.010, False, ["a", "b"], [], [], None),
    ("a full batch runs at once",
     [Q(c, rows=2) for c in "abcd"], 0.0, False, list("abcd"), [], [], None),
    ("a preferred size with nothing else waiting runs at once",
     [Q(c) for c in "abcd"], 0.0, False, list("abcd"), [], [], None),
    ("a size that is not preferred waits",
     [Q(c) for c in "abc"], 0.0, False, [], [], list("abc"), 0.010),
    ("rows are packed: a request that would overflow the batch waits for the next",
     [Q("a", rows=3), Q("b", rows=3), Q("c", rows=3)], 0.0, False, ["a", "b"], [], ["c"],
     None),
    ("an earlier deadline wakes the batcher before the delay",
     [Q("a", deadline=0.003), Q("b")], 0.0, False, [], [], ["a", "b"], 0.003),
    ("an expired request is removed and reported; the rest keep their place",
     [Q("a", deadline=0.002), Q("b", enqueued=0.001)], 0.002, False, [], ["a"], ["b"], 0.011),
    ("cancelled requests are dropped wherever they sit",
     [Q("a", cancelled=True), Q("b"), Q("c", cancelled=True)], 0.0, False, [], [], ["b"],
     0.010),
    ("cancelled requests leave room: the rest is a preferred size",
     [Q("a"), Q("x", cancelled=True), Q("b"), Q("c"), Q("d")], 0.0, False, list("abcd"), [],
     [], None),
    ("a request of other shapes does not join the head's batch, which leaves at once",
     [Q("a"), Q("b", shapes=(1, 28, 27)), Q("c")], 0.0, False, ["a"], [], ["b", "c"], None),
    ("draining runs what is queued without waiting",
     [Q("a")], 0.0, True, ["a"], [], [], None),
]




@pytest.mark.parametrize(("queue", "now", "drain", "batch", "expired", "waiting", "wake_at"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tritons_delay_rule(queue: list[Q], now: float, drain: bool, batch: list[str],
                            expired: list[str], waiting: list[str], wake_at: float | None
                            ) -> None:
    selection = select_batch(queue, now, POLICY, UNMEASURED, 0.0, drain)
    assert names(selection.batch) == batch
    assert names(selection.expired) == expired
    assert names(selection.waiting) == waiting
    assert selection.wake_at == pytest.approx(wake_at)


def linear_cost(launch_s: float, per_image_s: float) -> Callable[[int], float]:
    return lambda rows: launch_s + per_image_s * rows


GPU = linear_cost(0.010, 0.0002)
"""The accelerator-shaped backend: 10 ms launch, 0.2 ms per image."""
CPU = linear_cost(0.00084, 0.000227)
"""AlexNet (quick preset) on this host's CPU, in process: 1.07 ms alone, 8.1 ms for 32."""


def measured(true_cost: Callable[[int], float], limit: int) -> CostModel:
    """A cost model warmed at every size, as the server's warm-up leaves it."""
    cost = CostModel(limit)
    for rows in range(1, limit + 1):
        cost.observe(rows, true_cost(rows))
    return cost


BUDGET = dataclasses.replace(POLICY, max_batch_size=32, rule="budget", budget_s=0.050)


def test_the_cost_model_interpolates_between_measured_sizes_and_follows_runs() -> None:
    cost = CostModel(32)
    assert cost.seconds(4) == 0.0 and not cost.measured
    cost.observe(1, 0.002)
    assert cost.seconds(4) == pytest.approx(0.008)  # one size: proportional
    cost.observe(32, 0.033)
    assert cost.seconds(16) == pytest.approx(0.002 + 0.001 * 15)
    assert cost.seconds(64) == pytest.approx(0.065)  # extrapolated past the last
    for _ in range(50):
        cost.observe(32, 0.050)  # the host got slower: the estimate follows
    assert cost.seconds(32) == pytest.approx(0.050, rel=0.01)


def test_the_arrival_rate_follows_the_gaps_and_reads_quiet_after_a_silence() -> None:
    rate = ArrivalRate()
    assert rate.per_s(0.0) == 0.0
    for i in range(200):
        rate.observe(i * 0.001, 1)
    assert rate.per_s(0.199) == pytest.approx(1000, rel=0.01)
    assert rate.per_s(1.199) == pytest.approx(1.0, rel=0.01)  # a second of silence
    batched = ArrivalRate()
    for i in range(200):
        batched.observe(i * 0.004, 4)  # four images every 4 ms
    assert batched.per_s(0.796) == pytest.approx(1000, rel=0.01)


def test_lateness_settles_at_the_99th_percentile_and_follows_a_change() -> None:
    lateness = Lateness()
    rng = np.random.default_rng(0)
    for late in rng.normal(0.0, 0.005, 1000):  # answers on time, give or take
        lateness.observe(float(late))
    assert lateness.seconds == pytest.approx(0.0116, abs=0.003)  # 2.33 sigma
    slow = rng.exponential(0.010, 20_000) + 0.020  # a loaded host: 20 ms late and more
    for late in slow:
        lateness.observe(float(late))
    assert lateness.seconds == pytest.approx(float(np.quantile(slow, 0.99)), rel=0.15)
    for _ in range(20_000):  # early, for long: the margin falls to nothing, not below
        lateness.observe(-0.050)
    assert lateness.seconds == 0.0


def test_a_lone_request_in_a_quiet_model_runs_at_once() -> None:
    cost = measured(GPU, 32)
    selection = select_batch([Q("a")], 5.0, BUDGET, cost, 0.0)
    assert (names(selection.batch), selection.reason) == (["a"], "target")
    selection = select_batch([Q("a")], 5.0, BUDGET, cost, 10.0)  # 10/s: still quiet
    assert (names(selection.batch), selection.reason) == (["a"], "target")


def test_under_load_a_batch_waits_for_company_only_while_its_budget_allows() -> None:
    cost = measured(GPU, 32)
    # 1,000 images/s on a device that runs 98/s alone: 13 at a time keep up, so wait.
    assert target_rows(BUDGET, cost, 1000.0) == 13
    queue = [Q(c, enqueued=0.0) for c in "abcd"]
    selection = select_batch(queue, 0.001, BUDGET, cost, 1000.0)
    assert selection.batch == [] and names(selection.waiting) == list("abcd")
    last = 0.5 * 0.050 - cost.seconds(4)  # half the budget, less its own run
    assert selection.wake_at == pytest.approx(last)
    selection = select_batch(queue, last, BUDGET, cost, 1000.0)
    assert (names(selection.batch), selection.reason) == (list("abcd"), "budget")
    enough = [Q(str(i)) for i in range(13)]
    assert select_batch(enough, 0.001, BUDGET, cost, 1000.0).reason == "target"
    full = [Q(str(i)) for i in range(40)]
    selection = select_batch(full, 0.0, BUDGET, cost, 1000.0)
    assert (selection.rows, selection.reason, len(selection.waiting)) == (32, "full", 8)


def test_the_target_grows_with_the_rate_and_shrinks_with_more_instances() -> None:
    cost = measured(GPU, 32)
    targets = [target_rows(BUDGET, cost, r) for r in (0, 50, 200, 500, 1000, 1500, 5000)]
    assert targets == sorted(targets) and targets[0] == 1 and targets[-1] == 32
    two = dataclasses.replace(BUDGET, instances=2)
    assert target_rows(two, cost, 1000.0) < target_rows(BUDGET, cost, 1000.0)


def test_the_budget_is_set_or_derived_from_the_models_cost() -> None:
    derived = dataclasses.replace(BUDGET, budget_s=None)
    slow = measured(linear_cost(0.010, 0.002), 32)  # 74 ms for 32 images
    assert derived_budget_s(derived, slow) == pytest.approx(BUDGET_BATCHES * 0.074)
    assert budget_s(derived, slow) == derived_budget_s(derived, slow)
    assert budget_s(dataclasses.replace(BUDGET, budget_s=0.020), slow) == 0.020
    assert derived_budget_s(derived, measured(CPU, 32)) == MIN_BUDGET_S


def test_a_request_is_answered_after_the_full_batches_ahead_of_it() -> None:
    cost = measured(GPU, 32)
    assert answer_in_s(0, 1, 0.0, BUDGET, cost, 0.0) == pytest.approx(GPU(1))
    assert answer_in_s(10, 1, 0.004, BUDGET, cost, 0.0) == pytest.approx(0.004 + GPU(11))
    assert answer_in_s(70, 1, 0.0, BUDGET, cost, 0.0) == pytest.approx(2 * GPU(32) + GPU(7))
    two = dataclasses.replace(BUDGET, instances=2)
    assert answer_in_s(70, 1, 0.0, two, cost, 0.0) == pytest.approx(GPU(32) + GPU(7))
    # Those arriving while it waits join its batch: 1,000/s for 4 ms adds four images.
    assert answer_in_s(10, 1, 0.004, BUDGET, cost, 1000.0) == pytest.approx(0.004 + GPU(15))


@dataclass
class Simulated:
    """What a seeded run of the budget rule did."""

    latencies: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    refused: int = 0
    sent: int = 0
    peak_queue: int = 0

    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99)) if self.latencies else 0.0

    def mean_batch(self) -> float:
        return float(np.mean(self.batches))


@dataclass(frozen=True)
class SimRequest:
    rows: int
    enqueued: float
    deadline: float | None = None
    cancelled: bool = False
    shapes: object = None


def simulate(policy: BatchPolicy, true_cost: Callable[[int], float], rate: float,
             seconds: float = 20.0, seed: int = 0, noise: float = 0.05) -> Simulated:
    """Poisson arrivals of single images at `rate` for `seconds`, admitted and batched
    by the policy's own functions, on instances whose runs take `true_cost` times a
    seeded noise of +-`noise`; the cost model learns from each run, as the batcher's."""
    rng = np.random.default_rng(seed)
    cost = measured(true_cost, policy.limit)
    arrivals = ArrivalRate()
    out = Simulated()
    queue: list[SimRequest] = []
    free_at = [0.0] * policy.instances
    running: list[tuple[float, int, list[SimRequest]]] = []  # (ends, instance, batch)
    now, next_arrival, wake = 0.0, float(rng.exponential(1 / rate)), math.inf
    while next_arrival < seconds or queue or running:
        now = min(next_arrival if next_arrival < seconds else math.inf,
                  running[0][0] if running else math.inf, wake)
        wake = math.inf
        if running and running[0][0] <= now:
            ended, instance, batch = heapq.heappop(running)
            out.latencies += [ended - r.enqueued for r in batch]
            free_at[instance] = 0.0
        elif next_arrival <= now:
            arrivals.observe(now, 1)
            out.sent += 1
            busy = [t for t in free_at if t > now]
            free_in = 0.0 if len(busy) < len(free_at) else min(busy) - now
            queued = sum(r.rows for r in queue)
            if answer_in_s(queued, 1, free_in, policy, cost, arrivals.per_s(now)) > (
                    ADMIT_SHARE * budget_s(policy, cost)):
                out.refused += 1
            else:
                queue.append(SimRequest(1, now))
                out.peak_queue = max(out.peak_queue, len(queue))
            next_arrival = now + float(rng.exponential(1 / rate))
        for instance, busy_until in enumerate(free_at):
            if busy_until or not queue:
                continue
            selection = select_batch(queue, now, policy, cost, arrivals.per_s(now))
            queue = selection.waiting
            if not selection.batch:
                wake = min(wake, selection.wake_at or math.inf)
                continue
            took = true_cost(selection.rows) * (1 + noise * float(rng.uniform(-1, 1)))
            cost.observe(selection.rows, took)
            free_at[instance] = now + took
            heapq.heappush(running, (now + took, instance, selection.batch))
            out.batches.append(selection.rows)
    return out


def capacity(true_cost: Callable[[int], float], policy: BatchPolicy) -> float:
    """Images/s the instances serve at their largest batch."""
    return policy.instances * policy.limit / true_cost(policy.limit)


@pytest.mark.parametrize(("shape", "policy"), [
    ("gpu", BUDGET),
    ("gpu, 2 instances", dataclasses.replace(BUDGET, instances=2)),
    ("cpu, derived budget", dataclasses.replace(BUDGET, budget_s=None)),
    ("cpu, a tight budget", dataclasses.replace(BUDGET, budget_s=0.020)),
])
def test_poisson_arrivals_are_answered_within_budget_up_to_capacity_in_growing_batches(
        shape: str, policy: BatchPolicy) -> None:
    true_cost = CPU if shape.startswith("cpu") else GPU
    top = capacity(true_cost, policy)
    budget = budget_s(policy, measured(true_cost, policy.limit))
    batches = []
    for share in (0.05, 0.2, 0.4, 0.6, 0.8, 0.9):
        run = simulate(policy, true_cost, share * top, seconds=10.0, seed=int(share * 100))
        # A Poisson burst near capacity may be refused: never more than 1%.
        assert run.refused <= (0 if share < 0.8 else 0.01 * run.sent), (
            f"{shape} at {share:.0%} of capacity refused {run.refused} of {run.sent}")
        assert run.p99() <= budget, f"{shape} at {share:.0%}: p99 {run.p99() * 1e3:.1f} ms"
        assert len(run.latencies) + run.refused == run.sent  # nothing accepted is lost
        batches.append(run.mean_batch())
    assert batches == sorted(batches), f"{shape}: mean batches {batches}"
    assert batches[0] < 2 and batches[-1] > 0.4 * policy.limit, f"{shape}: {batches}"


def test_a_lone_request_on_a_quiet_model_waits_for_nothing() -> None:
    run = simulate(BUDGET, GPU, 2.0, seconds=30.0)  # one request every half second
    assert set(run.batches) == {1}
    # Each runs the moment it arrives (one that came within 10 ms of another waits for
    # that one's run, not for company).
    assert float(np.median(run.latencies)) == pytest.approx(GPU(1), rel=0.06)


@pytest.mark.parametrize("true_cost", [GPU, CPU], ids=["gpu", "cpu"])
def test_past_capacity_requests_that_cannot_meet_the_budget_are_refused_at_once(
        true_cost: Callable[[int], float]) -> None:
    policy = dataclasses.replace(BUDGET, budget_s=None) if true_cost is CPU else BUDGET
    budget = budget_s(policy, measured(true_cost, policy.limit))
    run = simulate(policy, true_cost, 1.5 * capacity(true_cost, policy), seconds=5.0)
    assert run.refused > 0.2 * run.sent
    assert len(run.latencies) + run.refused == run.sent  # each answered or refused
    assert run.p99() <= budget
    # The queue holds no more than the budget can answer: memory stays bounded.
    assert run.peak_queue <= budget / true_cost(policy.limit) * policy.limit


CONFIG = ModelConfig(name="lenet", max_batch_size=32, preferred_batch_sizes=(8, 16, 32),
                     max_queue_delay_us=2000,
                     inputs=(TensorSpec(name="input", shape=(1, 28, 28)),),
                     outputs=(TensorSpec(name="logits", shape=(2,)),), labels=("a", "b"))


def test_the_policy_comes_from_config_json_and_server_defaults() -> None:
    policy = resolve_policy("lenet", CONFIG, EngineOptions(max_queue_size=7))
    assert policy == BatchPolicy(max_batch_size=32, rule="budget", budget_s=None,
                                 max_queue_delay_s=0.002,
                                 preferred_batch_sizes=frozenset({8, 16, 32}),
                                 max_queue_size=7, instances=1)


def test_the_budget_comes_from_the_model_entry_then_config_json_then_the_server() -> None:
    with_budget = CONFIG.model_copy(update={"latency_budget_ms": 40.0})
    assert resolve_policy("lenet", with_budget, EngineOptions()).budget_s == 0.040
    server = EngineOptions(latency_budget_ms=25.0)
    assert resolve_policy("lenet", CONFIG, server).budget_s == 0.025
    assert resolve_policy("lenet", with_budget, server).budget_s == 0.040
    entry = EngineOptions(latency_budget_ms=25.0,
                          models={"lenet": ModelOverrides(latency_budget_ms=8.0)})
    assert resolve_policy("lenet", with_budget, entry).budget_s == 0.008


def test_flags_override_config_json_and_the_model_entry_overrides_flags() -> None:
    settings = EngineOptions(max_batch_size=16, max_queue_delay_us=500, instances=2,
                               models={"lenet": ModelOverrides(max_batch_size=4, instances=3)})
    policy = resolve_policy("lenet", CONFIG, settings)
    assert (policy.max_batch_size, policy.max_queue_delay_s, policy.instances) == (4, 0.0005, 3)
    other = resolve_policy("alexnet", CONFIG, settings)
    assert (other.max_batch_size, other.instances) == (16, 2)


def test_triton_s_delay_rule_is_a_setting_for_the_server_or_one_model() -> None:
    settings = EngineOptions(batching="delay",
                               models={"lenet": ModelOverrides(batching="budget")})
    assert resolve_policy("lenet", CONFIG, settings).rule == "budget"
    assert resolve_policy("alexnet", CONFIG, settings).rule == "delay"


def test_a_zero_or_empty_override_is_an_override() -> None:
    settings = EngineOptions(models={"lenet": ModelOverrides(max_queue_delay_us=0,
                                                               preferred_batch_sizes=())})
    policy = resolve_policy("lenet", CONFIG, settings)
    assert (policy.max_queue_delay_s, policy.preferred_batch_sizes) == (0.0, frozenset())


def test_preferred_sizes_above_an_overridden_max_batch_are_dropped() -> None:
    policy = resolve_policy("lenet", CONFIG, EngineOptions(max_batch_size=12))
    assert policy.preferred_batch_sizes == frozenset({8})


def test_config_json_without_preferred_sizes_gets_the_defaults_that_fit() -> None:
    config = ModelConfig.model_validate({**CONFIG.model_dump(exclude={"preferred_batch_sizes"}),
                                         "max_batch_size": 16})
    assert config.preferred_batch_sizes == (8, 16)
