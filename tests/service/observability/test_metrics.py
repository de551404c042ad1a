"""The tallies the hot path writes, and the flush that moves them into Prometheus: a
scrape shows exactly what per-request prometheus_client calls would have shown."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from service.observability.metrics import LATENCY_BUCKETS, Buckets, Metrics, _add
from service.status import Status


def test_a_flushed_tally_exports_what_observing_each_value_would() -> None:
    values = np.random.default_rng(0).exponential(0.002, 5000).tolist()
    values += [0.0, 25e-6, 10.0, 11.0, *LATENCY_BUCKETS]  # on the bounds, and past the last
    direct, flushed = CollectorRegistry(), CollectorRegistry()
    one = Histogram("h", "x", ["m"], buckets=LATENCY_BUCKETS, registry=direct)
    other = Histogram("h", "x", ["m"], buckets=LATENCY_BUCKETS, registry=flushed)
    tally = Buckets(LATENCY_BUCKETS)
    for half in (values[:2000], values[2000:]):  # two flushes add up
        for v in half:
            one.labels("a").observe(v)
            tally.observe(v)
        _add(other.labels("a"), tally)
        assert not any(tally.counts) and tally.total == 0.0
    def samples(registry: CollectorRegistry) -> dict[str, float]:
        return {s.name + str(sorted(s.labels.items())): s.value
                for m in registry.collect() for s in m.samples if s.name != "h_created"}

    expected, got = samples(direct), samples(flushed)
    assert expected.keys() == got.keys()
    for key, value in expected.items():  # counts exactly; the sum up to rounding
        assert got[key] == (pytest.approx(value, rel=1e-12) if "_sum" in key else value), key


def test_a_scrape_sees_every_call_counted_before_it() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for _ in range(3):
        metrics.requests["lenet", "oip", Status.OK] += 1
    metrics.requests["unknown", "oip", Status.RESOURCE_EXHAUSTED] += 1
    metrics.in_flight["oip"] += 2
    metrics.held_bytes = 1234
    tally = metrics.model("lenet", "1")
    tally.inferences, tally.executions, tally.depth = 96, 3, 5
    for _ in range(3):
        tally.batch_size.observe(32)
    metrics.latency["lenet", 1, "oip", Status.OK].observe(0.001)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("cnnserve_requests_total", model="lenet", api="oip", code="OK") == 3
    assert sample("cnnserve_requests_total", model="unknown", api="oip",
                  code="RESOURCE_EXHAUSTED") == 1
    assert sample("cnnserve_in_flight_calls", api="oip") == 2
    assert sample("cnnserve_memory_held_bytes") == 1234
    assert sample("cnnserve_inferences_total", model="lenet", version="1") == 96
    assert sample("cnnserve_executions_total", model="lenet", version="1") == 3
    assert sample("cnnserve_queue_depth", model="lenet", version="1") == 5
    assert sample("cnnserve_batch_size_count", model="lenet", version="1") == 3
    assert sample("cnnserve_request_latency_seconds_count", model="lenet", version="1",
                  api="oip", code="OK") == 1
    metrics.requests["lenet", "oip", Status.OK] += 1  # counters add up across scrapes
    assert sample("cnnserve_requests_total", model="lenet", api="oip", code="OK") == 4
    assert sample("cnnserve_inferences_total", model="lenet", version="1") == 96


def test_a_model_exports_zeros_before_its_first_request() -> None:
    registry = CollectorRegistry()
    Metrics(registry).model("vgg", "2")
    assert registry.get_sample_value("cnnserve_executions_total",
                                     {"model": "vgg", "version": "2"}) == 0


def _serving_from_this_loop() -> tuple[CollectorRegistry, Metrics, list[int]]:
    """Metrics flushed on the running loop, and the thread of each flush, as it happens."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.serve_from(asyncio.get_running_loop())
    flushed_on: list[int] = []
    real_flush = metrics.flush

    def flush() -> None:
        flushed_on.append(threading.get_ident())
        real_flush()

    metrics.flush = flush  # type: ignore[method-assign]
    return registry, metrics, flushed_on


def test_a_scrape_from_another_thread_is_flushed_on_the_loop_that_counts() -> None:
    async def main() -> tuple[float | None, bool]:
        registry, metrics, flushed_on = _serving_from_this_loop()
        metrics.requests["lenet", "http", Status.OK] += 7
        value = await asyncio.to_thread(registry.get_sample_value, "cnnserve_requests_total",
                                        {"model": "lenet", "api": "http", "code": "OK"})
        return value, flushed_on == [threading.get_ident()]

    value, on_loop = asyncio.run(main())
    assert value == 7 and on_loop


def test_scrapes_that_arrive_together_cost_the_loop_one_flush() -> None:
    """A flood of scrapes while the loop is busy waits for one flush, not one each."""
    async def main() -> tuple[int, list[float | None]]:
        registry, metrics, flushes = _serving_from_this_loop()
        metrics.requests["lenet", "oip", Status.OK] += 5
        values: list[float | None] = []

        def scrape() -> None:
            values.append(registry.get_sample_value(
                "cnnserve_requests_total", {"model": "lenet", "api": "oip", "code": "OK"}))

        arrived: list[int] = []
        real_scrape = metrics._flush_for_scrape  # noqa: SLF001

        def counted() -> None:
            arrived.append(1)
            real_scrape()

        metrics._flush_for_scrape = counted  # type: ignore[method-assign]  # noqa: SLF001
        scrapers = [threading.Thread(target=scrape) for _ in range(20)]
        for thread in scrapers:
            thread.start()
        deadline = time.monotonic() + 10
        while len(arrived) < 20 and time.monotonic() < deadline:
            time.sleep(0.001)  # holds the loop: the scrapes pile up behind one flush
        time.sleep(0.05)

        def join() -> None:
            for thread in scrapers:
                thread.join(10)

        await asyncio.to_thread(join)
        return len(flushes), values

    flushed, values = asyncio.run(main())
    assert values == [5.0] * 20
    assert flushed == 1
