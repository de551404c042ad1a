"""Admission rules, in-process: caps, the memory budget and what closing gives back."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from service.core.admission import Admission, AdmissionLimits, Call, Kind
from service.observability.metrics import Metrics
from service.status import ServingError, Status, bounded

LIMITS = AdmissionLimits(max_calls=2, max_streams=1, memory_budget_bytes=1000,
                         max_bytes_per_connection=600)


def admission(max_calls: int = 2) -> Admission:
    limits = AdmissionLimits(**{**LIMITS.__dict__, "max_calls": max_calls})
    return Admission(limits, Metrics(CollectorRegistry()))


def refused(action: object) -> str:
    with pytest.raises(ServingError) as err:
        action()  # type: ignore[operator]
    assert err.value.status is Status.RESOURCE_EXHAUSTED
    return str(err.value)


def test_calls_past_the_cap_are_refused_but_probes_always_enter() -> None:
    a = admission()
    calls = [a.open("oip", "c1", Kind.WORK), a.open("oip", "c2", Kind.WORK)]
    assert "limit of 2 calls" in refused(lambda: a.open("oip", "c3", Kind.WORK))
    probes = [a.open("probe", "c3", Kind.PROBE) for _ in range(100)]
    a.close(calls[0])
    a.open("oip", "c3", Kind.WORK)
    for p in probes:
        a.close(p)
    assert a.calls == 2


def test_long_lived_streams_have_a_pool_of_their_own() -> None:
    a = admission()
    watch = a.open("health_watch", "c1", Kind.STREAM)
    assert "open streams" in refused(lambda: a.open("health_watch", "c2", Kind.STREAM))
    a.open("oip", "c2", Kind.WORK)  # streams do not use up the call slots
    a.close(watch)
    a.open("health_watch", "c2", Kind.STREAM)


def test_the_budget_and_each_connections_share_refuse_before_allocating() -> None:
    a = admission(max_calls=3)
    one, two, other = (a.open("oip", c, Kind.WORK) for c in ("c1", "c1", "c2"))
    one.charge(500, "the request message")
    assert "this connection already holds 500 of its 600" in refused(
        lambda: two.charge(200, "the request message"))
    other.charge(450, "decoding the images")
    assert "memory budget" in refused(lambda: other.charge(100, "the response"))
    assert a.held == 950
    a.close(one)
    assert a.held == 450 and one.held == 0
    two.charge(500, "the request message")  # c1's share was given back
    a.close(two)
    a.close(other)
    assert a.held == 0 and a.metrics.registry.get_sample_value(
        "cnnserve_memory_held_bytes") == 0


def test_probes_are_never_charged() -> None:
    a = admission()
    a.open("oip", "c1", Kind.WORK).charge(600, "x")
    a.open("oip", "c2", Kind.WORK).charge(400, "x")  # the budget is full
    probe = a.open("probe", "c1", Kind.PROBE)
    probe.charge(10**9, "x")  # no refusal
    assert (probe.held, a.held) == (0, 1000)
    a.close(probe)
    assert a.held == 1000


def test_closing_a_call_stops_its_work_off_the_loop() -> None:
    import threading

    a = admission()
    call = a.open("classifier", "c1", Kind.WORK)
    call.stop = threading.Event()
    a.close(call)
    assert call.stopped


def test_error_texts_are_bounded_and_hold_no_reprs() -> None:
    text = bounded("cannot identify image file <_io.BytesIO object at 0x7f3a2b1c> " + "x" * 5000)
    assert "0x7f" not in text and "<object>" in text
    assert len(text) < 450 and text.endswith("characters)")
    assert len(str(ServingError(Status.NOT_FOUND, "y" * 20000))) < 450


def waiting(a: Admission, client: str) -> tuple[Call, asyncio.Task[None]]:
    """A call whose request has not arrived: its task reads it (here, sleeps)."""
    call = a.open("oip", client, Kind.WORK)
    task = asyncio.get_running_loop().create_task(asyncio.sleep(60))
    call.wait_for_request(task)
    return call, task


async def settled(tasks: list[asyncio.Task[None]]) -> list[bool]:
    """Which of `tasks` were cancelled, once those that were have ended."""
    await asyncio.sleep(0)
    return [t.cancelled() for t in tasks]


def test_at_the_cap_a_light_client_takes_a_waiting_slot_of_the_heaviest() -> None:
    async def scenario() -> None:
        a = admission(max_calls=4)
        flood, tasks = zip(*(waiting(a, "flood") for _ in range(3)), strict=True)
        working, task = waiting(a, "light")
        working.request_arrived()  # its request came: it is working, never evicted
        newcomer = a.open("oip", "other", Kind.WORK)  # holds 0 < its share: flood's oldest
        assert await settled([*tasks, task]) == [True, False, False, False]
        assert flood[0].refusal is not None and "went to a client holding fewer" in str(
            flood[0].refusal) and a.calls == 4
        a.close(flood[0])  # the evicted call ends later; its slot was already given back
        assert a.calls == 4
        # The flood, at its share or above, gets no slot of anyone's.
        assert "limit of 4 calls" in refused(lambda: a.open("oip", "flood", Kind.WORK))
        # Nor does a client that would hold as many as the heaviest after taking one.
        assert "limit of 4 calls" in refused(lambda: a.open("oip", "light", Kind.WORK))
        for call in (*flood[1:], working, newcomer):
            a.close(call)
        assert a.calls == 0 and await settled([*tasks, task]) == [True, False, False, False]
        for t in (*tasks, task):
            t.cancel()

    asyncio.run(scenario())


def test_calls_whose_request_arrived_are_never_evicted() -> None:
    async def scenario() -> None:
        a = admission(max_calls=2)
        calls = [waiting(a, "busy") for _ in range(2)]
        for call, _ in calls:
            call.request_arrived()
        assert "limit of 2 calls" in refused(lambda: a.open("oip", "other", Kind.WORK))
        assert await settled([t for _, t in calls]) == [False, False]
        for _, t in calls:
            t.cancel()

    asyncio.run(scenario())


def test_a_request_that_does_not_arrive_in_time_ends_its_call() -> None:
    """Each sweep ages the calls still waiting; one that waited `after` sweeps is ended
    with DEADLINE_EXCEEDED and its slot given back, and one whose request came is not."""
    async def scenario() -> None:
        a = admission(max_calls=4)
        slow, slow_task = waiting(a, "slowloris")
        a.expire_waiting(3, 5.0)
        late, late_task = waiting(a, "slowloris")
        prompt, prompt_task = waiting(a, "ok")
        prompt.request_arrived()
        assert [a.expire_waiting(3, 5.0) for _ in range(2)] == [0, 1]
        assert await settled([slow_task, late_task, prompt_task]) == [True, False, False]
        assert slow.refusal is not None and slow.refusal.status is Status.DEADLINE_EXCEEDED
        assert "within 5s" in str(slow.refusal) and a.calls == 2
        assert a.expire_waiting(3, 5.0) == 1 and late.refusal is not None
        a.close(slow)
        a.close(late)
        a.close(prompt)
        assert a.calls == 0
        prompt_task.cancel()

    asyncio.run(scenario())


def requests_counted(a: Admission, model: str, api: str, code: str) -> float:
    value = a.metrics.registry.get_sample_value(
        "cnnserve_requests_total", {"model": model, "api": api, "code": code})
    return value or 0.0


def test_an_admitted_call_is_closed_and_counted_once_with_the_status_it_ended_with() -> None:
    a = admission()
    with a.admit("oip", "c1", Kind.WORK) as call:
        call.model = "lenet"
        call.charge(100, "x")
        assert a.calls == 1
    with pytest.raises(ServingError), a.admit("oip", "c1", Kind.WORK) as call:
        call.model = "lenet"
        raise ServingError(Status.NOT_FOUND, "no such version")
    with a.admit("oip", "c1", Kind.WORK) as call:
        call.status = Status.UNAVAILABLE  # what the protocol answered itself
    assert (a.calls, a.held) == (0, 0)
    assert requests_counted(a, "lenet", "oip", "OK") == 1
    assert requests_counted(a, "lenet", "oip", "NOT_FOUND") == 1
    assert requests_counted(a, "unknown", "oip", "UNAVAILABLE") == 1


def test_a_refused_call_is_counted_and_raised_and_holds_nothing() -> None:
    a = admission(max_calls=1)
    with a.admit("oip", "c1", Kind.WORK) as call:
        with pytest.raises(ServingError) as err, call.sibling("oip_stream"):
            pytest.fail("a call past the cap was admitted")
        assert err.value.status is Status.RESOURCE_EXHAUSTED
        assert a.calls == 1
    assert a.calls == 0
    assert requests_counted(a, "unknown", "oip_stream", "RESOURCE_EXHAUSTED") == 1
    assert requests_counted(a, "unknown", "oip", "OK") == 1
