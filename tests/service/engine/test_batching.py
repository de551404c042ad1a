"""Batch selection and policy resolution as pure functions: every rule, in milliseconds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from contract.repository import ModelConfig, TensorSpec
from service.engine.batching import BatchPolicy, resolve_policy, select_batch
from service.engine.options import EngineOptions, ModelOverrides

POLICY = BatchPolicy(max_batch_size=8, max_queue_delay_s=0.010,
                     preferred_batch_sizes=frozenset({4}), max_queue_size=100, instances=1)


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


WORK_CONSERVING = dataclasses.replace(POLICY, work_conserving=True)


@pytest.mark.parametrize(("queue", "now", "batch", "waiting"), [
    ([Q("a")], 0.0, ["a"], []),
    ([Q("a"), Q("b"), Q("c")], 0.0, ["a", "b", "c"], []),
    ([Q(c, rows=3) for c in "abc"], 0.0, ["a", "b"], ["c"]),
    ([Q("a"), Q("b", shapes=(1, 28, 27))], 0.0, ["a"], ["b"]),
], ids=["a lone request runs at once", "what is queued runs at once, not a preferred size",
        "still at most max_batch_size", "still only equal shapes"])
def test_a_work_conserving_policy_runs_what_is_queued_when_an_instance_is_idle(
        queue: list[Q], now: float, batch: list[str], waiting: list[str]) -> None:
    selection = select_batch(queue, now, WORK_CONSERVING)
    assert (names(selection.batch), names(selection.waiting)) == (batch, waiting)


@pytest.mark.parametrize(("queue", "now", "drain", "batch", "expired", "waiting", "wake_at"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_select_batch(queue: list[Q], now: float, drain: bool, batch: list[str],
                      expired: list[str], waiting: list[str], wake_at: float | None) -> None:
    selection = select_batch(queue, now, POLICY, drain)
    assert names(selection.batch) == batch
    assert names(selection.expired) == expired
    assert names(selection.waiting) == waiting
    assert selection.wake_at == pytest.approx(wake_at)


CONFIG = ModelConfig(name="lenet", max_batch_size=32, preferred_batch_sizes=(8, 16, 32),
                     max_queue_delay_us=2000,
                     inputs=(TensorSpec(name="input", shape=(1, 28, 28)),),
                     outputs=(TensorSpec(name="logits", shape=(2,)),), labels=("a", "b"))


def test_the_policy_comes_from_config_json_and_server_defaults() -> None:
    policy = resolve_policy("lenet", CONFIG, EngineOptions(max_queue_size=7,
                                                             inline_compute_us=100))
    assert policy == BatchPolicy(max_batch_size=32, max_queue_delay_s=0.002,
                                 preferred_batch_sizes=frozenset({8, 16, 32}),
                                 max_queue_size=7, instances=1, work_conserving=True,
                                 inline_compute_s=1e-4)


def test_flags_override_config_json_and_the_model_entry_overrides_flags() -> None:
    settings = EngineOptions(max_batch_size=16, max_queue_delay_us=500, instances=2,
                               models={"lenet": ModelOverrides(max_batch_size=4, instances=3)})
    policy = resolve_policy("lenet", CONFIG, settings)
    assert (policy.max_batch_size, policy.max_queue_delay_s, policy.instances) == (4, 0.0005, 3)
    other = resolve_policy("alexnet", CONFIG, settings)
    assert (other.max_batch_size, other.instances) == (16, 2)


def test_triton_s_delay_rule_is_a_setting_for_the_server_or_one_model() -> None:
    settings = EngineOptions(batching="delay",
                               models={"lenet": ModelOverrides(batching="work-conserving")})
    assert resolve_policy("lenet", CONFIG, settings).work_conserving
    assert not resolve_policy("alexnet", CONFIG, settings).work_conserving


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
