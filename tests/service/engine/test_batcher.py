"""Dynamic batching, admission and shutdown, observed from outside a real server."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2, service_pb2_grpc

from contract.repository import latest_model_file, serving_config
from service.engine.batcher import DynamicBatcher
from service.engine.batching import BatchPolicy
from service.engine.options import EngineOptions
from service.engine.runtime import ModelRunner, Tensors
from service.observability.metrics import Metrics, ModelStats
from service.status import ServingError, Status
from tests.servers import ServerProcess, start_server
from tests.service.oip import logits, metric, request, stub_for, wait_until


def test_concurrent_single_images_are_batched_and_answered_individually(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--batching", "delay", "--max-queue-delay-us", "20000")
    stub = stub_for(server)
    images = np.random.default_rng(0).standard_normal((32, 1, 1, 28, 28)).astype(np.float32)
    alone = [logits(stub.ModelInfer(request(x), timeout=30)) for x in images[:4]]
    before = server.metrics()
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda x: logits(stub.ModelInfer(request(x), timeout=30)),
                                 images))
    after = server.metrics()
    for solo, batched in zip(alone, together[:4], strict=True):  # each caller got its own row
        np.testing.assert_allclose(batched, solo, rtol=1e-5, atol=1e-5)
    assert len({r.tobytes() for r in together}) == 32
    batches = (metric(after, "cnnserve_batch_size_count")
               - metric(before, "cnnserve_batch_size_count"))
    images_run = (metric(after, "cnnserve_batch_size_sum")
                  - metric(before, "cnnserve_batch_size_sum"))
    assert images_run == 32
    assert batches < 32, "no request was batched with another"
    assert (metric(after, "cnnserve_inferences_total")
            - metric(after, "cnnserve_executions_total")) > 0


def test_work_conserving_runs_a_lone_request_at_once_and_batches_while_the_model_is_busy(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--max-queue-delay-us", "3000000")  # default policy
    stub = stub_for(server)
    images = np.random.default_rng(1).standard_normal((64, 16, 1, 64, 64)).astype(np.float32)
    before = server.metrics()
    for x in np.random.default_rng(2).standard_normal((3, 1, 1, 28, 28)).astype(np.float32):
        stub.ModelInfer(request(x), timeout=30)
    waited = (metric(server.metrics(), "cnnserve_queue_wait_seconds_sum")
              - metric(before, "cnnserve_queue_wait_seconds_sum"))
    assert waited < 1.0, "a lone request waited for company on an idle model"  # delay: 9 s
    before = server.metrics()
    # One burst of 16-image requests, all on the wire before the first is answered, so the
    # model is busy while they arrive. Single images from 32 threads were not: this tiny
    # model answered each before the server had read the next (62-64 of 64 ran alone under
    # load), which is work-conserving batching doing its job, not a batch to count.
    calls = [stub.ModelInfer.future(request(x, model="alexnet"), timeout=30) for x in images]
    for call in calls:
        call.result()
    after = server.metrics()
    batches = (metric(after, "cnnserve_batch_size_count", "alexnet")
               - metric(before, "cnnserve_batch_size_count", "alexnet"))
    assert batches < len(calls), "no request was batched with another while the model was busy"


@pytest.fixture(scope="module")
def slow_server(served_repo: Path) -> Iterator[ServerProcess]:
    """Batches wait 1.5 s for company and at most 2 requests may queue."""
    server = start_server(served_repo, "--batching", "delay",
                          "--max-queue-delay-us", "1500000", "--max-queue-size", "2")
    yield server
    server.terminate()


def test_a_full_queue_refuses_at_once_instead_of_growing(slow_server: ServerProcess) -> None:
    stub = stub_for(slow_server)
    finished: list[str] = []
    lock = threading.Lock()

    def call(i: int) -> str:
        try:
            stub.ModelInfer(request(np.zeros((1, 1, 28, 28), np.float32)), timeout=30)
            outcome = "OK"
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "(limit 2)" in exc.details()
            outcome = "RESOURCE_EXHAUSTED"
        with lock:
            finished.append(outcome)
        return outcome

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(call, range(6)))
    assert sorted(outcomes) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 4
    # Refusals come back while the accepted requests still wait for their batch.
    assert finished == ["RESOURCE_EXHAUSTED"] * 4 + ["OK"] * 2


def test_expired_and_cancelled_requests_never_reach_the_model(
        slow_server: ServerProcess) -> None:
    stub = stub_for(slow_server)
    stats = service_pb2.ModelStatisticsRequest(name="alexnet")
    before = stub.ModelStatistics(stats, timeout=10).model_stats[0].inference_count
    x = np.zeros((1, 1, 64, 64), np.float32)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request(x, "alexnet"), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: metric(slow_server.metrics(), "cnnserve_queue_depth", "alexnet") == 0)
    pending = stub.ModelInfer.future(request(x, "alexnet"), timeout=30)
    # Cancelled once the server holds it in the queue, not before it has seen it.
    wait_until(lambda: metric(slow_server.metrics(), "cnnserve_queue_depth", "alexnet") == 1)
    pending.cancel()
    assert pending.cancelled()
    wait_until(lambda: metric(slow_server.metrics(), "cnnserve_queue_depth", "alexnet") == 0)
    # A real request after them: run alone once its 1.5 s wait is over.
    assert logits(stub.ModelInfer(request(x, "alexnet"), timeout=30)).shape == (1, 10)
    after = stub.ModelStatistics(stats, timeout=10).model_stats[0]
    assert after.inference_count == before + 1


def test_sigterm_answers_queued_requests_refuses_new_ones_and_exits_0(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--batching", "delay", "--max-queue-delay-us", "1500000")
    stub = stub_for(server)
    x = np.random.default_rng(3).standard_normal((1, 1, 28, 28)).astype(np.float32)
    with ThreadPoolExecutor(4) as pool:
        queued: list[Future[service_pb2.ModelInferResponse]] = [
            pool.submit(stub.ModelInfer, request(x), timeout=30) for _ in range(4)]
        wait_until(lambda: metric(server.metrics(), "cnnserve_queue_depth") == 4)
        server.proc.send_signal(15)
        wait_until(lambda: any("shutting down" in line for line in server.lines))
        with pytest.raises(grpc.RpcError) as err:
            stub_for(server).ModelInfer(request(x), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        answers = [logits(f.result(timeout=30)) for f in queued]
    assert all(np.array_equal(a, answers[0]) for a in answers)
    assert server.proc.wait(30) == 0


def test_workers_share_one_port_and_their_metrics_are_summed(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    from tests.servers import free_port

    server = server_factory(served_repo, "--workers", "2", port=free_port(), processes=2)
    x = np.zeros((2, 1, 28, 28), np.float32)
    for _ in range(10):  # a new channel is a new connection: the kernel picks a worker
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert logits(stub.ModelInfer(request(x), timeout=30)).shape == (2, 10)
    # Each worker flushes its tallies every second: the parent serves what they flushed.
    wait_until(lambda: metric(server.metrics(), "cnnserve_inferences_total") == 20, timeout=10)
    text = server.metrics()
    assert len(re.findall(r"^cnnserve_requests_total\{", text, re.M)) >= 1
    assert server.terminate() == 0


class _GatedRunner(ModelRunner):
    """A real runner whose first batch waits until the test has blocked the event loop."""

    def __init__(self, *args: object, loop_blocked: threading.Event) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.loop_blocked = loop_blocked
        self.started = [threading.Event(), threading.Event()]
        self.calls = 0

    def run(self, inputs: Tensors, lone: bool = False) -> list[np.ndarray]:
        self.calls += 1
        self.started[min(self.calls, 2) - 1].set()
        if self.calls == 1:
            assert self.loop_blocked.wait(10), "the test never blocked its loop"
        return super().run(inputs, lone)


def test_a_ready_batch_runs_without_waiting_for_the_event_loop(served_repo: Path) -> None:
    """A busy model goes straight to its next full batch, even while the loop is stalled
    (by a burst of gRPC work, say): the compute thread takes the batch itself."""
    path = latest_model_file(served_repo, "lenet")
    config = serving_config(served_repo, "lenet", path)
    loop_blocked = threading.Event()
    runner = _GatedRunner(path, EngineOptions(repo=served_repo), config,
                          loop_blocked=loop_blocked)
    metrics = Metrics(CollectorRegistry())
    images = np.random.default_rng(0).standard_normal((2, 4, 1, 28, 28)).astype(np.float32)

    async def scenario() -> tuple[bool, list[list[np.ndarray]]]:
        with ThreadPoolExecutor(2) as executor:
            policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=10.0,
                                 preferred_batch_sizes=frozenset(), max_queue_size=8, instances=1)
            batcher = DynamicBatcher("lenet", [runner], executor, policy, metrics=metrics,
                                     stats=ModelStats())
            batcher.start()
            calls = [asyncio.create_task(batcher.infer({"input": x}))
                     for x in images]  # two full batches
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, runner.started[0].wait, 10)
            loop_blocked.set()
            second_ran_while_blocked = runner.started[1].wait(10)  # blocks the loop on purpose
            answers = await asyncio.gather(*calls)
            await batcher.close()
            return second_ran_while_blocked, answers

    second_ran_while_blocked, answers = asyncio.run(scenario())
    assert second_ran_while_blocked
    assert [a[0].shape for a in answers] == [(4, 10), (4, 10)]
    np.testing.assert_allclose(answers[1][0], ModelRunner.run(runner, {"input": images[1]})[0],
                               atol=1e-6)


class _ThreadRecordingRunner(ModelRunner):
    """A real runner that notes which thread ran each batch."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.threads: list[int] = []

    def run(self, inputs: Tensors, lone: bool = False) -> list[np.ndarray]:
        self.threads.append(threading.get_ident())
        return super().run(inputs, lone)


@pytest.mark.parametrize("inline_below_s", [1.0, 0.0])
def test_queued_requests_run_in_a_compute_thread_however_fast(served_repo: Path,
                                                              inline_below_s: float) -> None:
    """What waits in the queue runs off the event loop, even a size that runs faster than
    the policy's bound for lone callers: the loop goes on accepting calls meanwhile."""
    path = latest_model_file(served_repo, "lenet")
    config = serving_config(served_repo, "lenet", path)
    runner = _ThreadRecordingRunner(path, EngineOptions(repo=served_repo), config)
    images = np.random.default_rng(1).standard_normal((5, 2, 1, 28, 28)).astype(np.float32)
    sizes = [1, 1, 1, 2, 2]

    async def scenario() -> tuple[int, list[list[np.ndarray]]]:
        with ThreadPoolExecutor(1) as executor:
            policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=0.0,
                                 preferred_batch_sizes=frozenset(), max_queue_size=8,
                                 instances=1, work_conserving=True,
                                 inline_compute_s=inline_below_s)
            batcher = DynamicBatcher("lenet", [runner], executor, policy,
                                     metrics=Metrics(CollectorRegistry()), stats=ModelStats())
            batcher.start()
            answers = []
            for x, n in zip(images, sizes, strict=True):
                # Each after the last has left its thread, which would otherwise take it.
                await _until_idle(batcher)
                answers.append(await batcher.infer({"input": x[:n]}))
            await batcher.close()
            return threading.get_ident(), answers

    loop_thread, answers = asyncio.run(scenario())
    on_loop = [t == loop_thread for t in runner.threads]
    assert on_loop == [False] * 5
    for x, n, answer in zip(images, sizes, answers, strict=True):
        np.testing.assert_allclose(answer[0], ModelRunner.run(runner, {"input": x[:n]})[0],
                                   atol=1e-6)


@pytest.mark.parametrize("work_conserving", [True, False])
def test_a_lone_request_on_an_idle_model_runs_in_its_callers_task(
        served_repo: Path, work_conserving: bool) -> None:
    """With no other call in progress and the model idle, a request of a size that runs on
    the loop is answered in the caller's own step (no queue, no worker to wake); others,
    and every request under Triton's delay policy, wait in the queue as before."""
    path = latest_model_file(served_repo, "lenet")
    config = serving_config(served_repo, "lenet", path)
    runner = _ThreadRecordingRunner(path, EngineOptions(repo=served_repo), config)
    x = np.random.default_rng(2).standard_normal((1, 1, 28, 28)).astype(np.float32)
    stats = ModelStats()

    async def answered_in_one_step(batcher: DynamicBatcher, alone: bool) -> bool:
        call = batcher.infer({"input": x}, alone=alone)
        try:
            awaited = call.send(None)
        except StopIteration as done:
            np.testing.assert_allclose(done.value[0], ModelRunner.run(runner, {"input": x})[0],
                                       atol=1e-6)
            return True
        awaited._asyncio_future_blocking = False  # handed to us, not to a task
        await awaited  # the batcher's future: let the worker answer it
        with pytest.raises(StopIteration):
            call.send(None)
        return False

    async def scenario() -> list[bool]:
        with ThreadPoolExecutor(1) as executor:
            policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=0.001,
                                 preferred_batch_sizes=frozenset(), max_queue_size=8,
                                 instances=1, work_conserving=work_conserving,
                                 inline_compute_s=1.0)
            batcher = DynamicBatcher("lenet", [runner], executor, policy,
                                     metrics=Metrics(CollectorRegistry()), stats=stats)
            batcher.start()
            steps = []
            # The first of a size is timed by the worker; then lone, not lone, lone.
            for alone in (True, True, False, True):
                await _until_idle(batcher)
                steps.append(await answered_in_one_step(batcher, alone))
            await batcher.close()
            return steps

    steps = asyncio.run(scenario())
    assert steps == ([False, True, False, True] if work_conserving else [False] * 4)
    assert stats.execution_count == 4
    assert stats.inference_count == 4


async def _until_idle(batcher: DynamicBatcher, timeout_s: float = 10.0) -> None:
    """Until every instance waits for work (its thread, if one ran, has let go)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while batcher.idle_instances < batcher.policy.instances:
        assert loop.time() < give_up, "the batcher's workers never went idle"
        await asyncio.sleep(0.001)


class _SlowRunner(ModelRunner):
    """A real runner whose batches take at least `seconds`: a model far slower than the
    event loop, as AlexNet is at 32 clients. Notes each batch's size."""

    def __init__(self, *args: object, seconds: float) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.seconds = seconds
        self.sizes: list[int] = []

    def run(self, inputs: Tensors, lone: bool = False) -> list[np.ndarray]:
        self.sizes.append(len(inputs["input"]))
        time.sleep(self.seconds)
        return super().run(inputs, lone)


def _slow_lenet(served_repo: Path, seconds: float) -> _SlowRunner:
    path = latest_model_file(served_repo, "lenet")
    return _SlowRunner(path, EngineOptions(repo=served_repo),
                       serving_config(served_repo, "lenet", path), seconds=seconds)


def _started(runner: ModelRunner, executor: ThreadPoolExecutor, max_queue_delay_s: float
             ) -> DynamicBatcher:
    """A work-conserving batcher of up to 4 images over `runner`, started (on the loop)."""
    policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=max_queue_delay_s,
                         preferred_batch_sizes=frozenset(), max_queue_size=8, instances=1,
                         work_conserving=True, inline_compute_s=0.0)
    batcher = DynamicBatcher("lenet", [runner], executor, policy,
                             metrics=Metrics(CollectorRegistry()), stats=ModelStats())
    batcher.start()
    return batcher


@pytest.mark.parametrize(("compute_s", "delay_s", "back_after_s"), [
    (0.01, 1.0, (0.05, 0.2)),  # the loop outpaces the model (LeNet): back within the delay
    (0.4, 0.06, (0.09, 0.13)),  # a slow model: back after the delay, within its compute
], ids=["within-the-delay", "within-a-slow-batch"])
def test_callers_that_come_back_one_by_one_find_their_batch_waiting_for_them(
        served_repo: Path, compute_s: float, delay_s: float,
        back_after_s: tuple[float, float]) -> None:
    """A batch ends with nothing queued, and its callers send again one after another.
    The thread waits for them (up to the model's max_queue_delay_s, or a batch's compute
    time if longer, up to four delays: AlexNet on two busy cores) rather than running
    the first to come back alone and leaving the rest to batches of their own."""
    runner = _slow_lenet(served_repo, seconds=compute_s)
    images = np.random.default_rng(4).standard_normal((4, 1, 1, 28, 28)).astype(np.float32)

    async def scenario() -> list[list[np.ndarray]]:
        with ThreadPoolExecutor(1) as executor:
            batcher = _started(runner, executor, max_queue_delay_s=delay_s)

            async def caller(first: np.ndarray, then: np.ndarray, after_s: float
                             ) -> list[list[np.ndarray]]:
                answer = await batcher.infer({"input": first})
                await asyncio.sleep(after_s)  # the loop reads this caller's next request
                return [answer, await batcher.infer({"input": then})]

            answers = await asyncio.gather(caller(images[0], images[2], back_after_s[0]),
                                           caller(images[1], images[3], back_after_s[1]))
            await batcher.close()
            return [answers[0][0], answers[1][0], answers[0][1], answers[1][1]]

    answers = asyncio.run(scenario())
    assert runner.sizes == [2, 2]
    for x, answer in zip(images, answers, strict=True):
        np.testing.assert_allclose(answer[0], ModelRunner.run(runner, {"input": x})[0],
                                   atol=1e-6)


def test_a_round_of_callers_runs_as_one_batch(served_repo: Path) -> None:
    """Two callers' batch runs while two more queue; when it ends, the thread waits for
    the two it answered to come back and runs all four together, rather than the two
    queued now and the two returning next (two batches a round, each half full)."""
    runner = _slow_lenet(served_repo, seconds=0.2)
    images = np.random.default_rng(6).standard_normal((6, 1, 1, 28, 28)).astype(np.float32)

    async def scenario() -> list[list[np.ndarray]]:
        with ThreadPoolExecutor(1) as executor:
            batcher = _started(runner, executor, max_queue_delay_s=1.0)

            async def caller(first: np.ndarray, then: np.ndarray) -> list[list[np.ndarray]]:
                answer = await batcher.infer({"input": first})
                await asyncio.sleep(0.05)  # the loop reads this caller's next request
                return [answer, await batcher.infer({"input": then})]

            returning = [asyncio.create_task(caller(images[i], images[i + 4]))
                         for i in (0, 1)]
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 10
            while not runner.sizes:  # the first two are running
                assert loop.time() < give_up
                await asyncio.sleep(0.001)
            queued = [asyncio.create_task(batcher.infer({"input": images[i]})) for i in (2, 3)]
            first, second = await asyncio.gather(*returning)
            answers = [first[0], second[0], *await asyncio.gather(*queued), first[1], second[1]]
            await batcher.close()
            return answers

    answers = asyncio.run(scenario())
    assert runner.sizes == [2, 4]
    for x, answer in zip(images, answers, strict=True):
        np.testing.assert_allclose(answer[0], ModelRunner.run(runner, {"input": x})[0],
                                   atol=1e-6)


def test_a_lone_caller_of_several_images_at_a_time_never_waits_for_company(
        served_repo: Path) -> None:
    """The wait after a batch counts callers, not images: one client whose requests hold
    two images, then one, is alone, and nobody is waited for on its behalf."""
    runner = _slow_lenet(served_repo, seconds=0.01)
    images = np.random.default_rng(5).standard_normal((4, 1, 28, 28)).astype(np.float32)

    async def scenario() -> float:
        with ThreadPoolExecutor(1) as executor:
            batcher = _started(runner, executor, max_queue_delay_s=5.0)
            started = time.monotonic()
            for rows in (images[:2], images[2:3], images[3:4]):
                await batcher.infer({"input": rows})
            elapsed = time.monotonic() - started
            await batcher.close()
            return elapsed

    elapsed = asyncio.run(scenario())
    assert runner.sizes == [2, 1, 1]
    assert elapsed < 2.5, f"{elapsed:.1f}s: a lone caller's request waited for company"


@pytest.mark.parametrize("returns", [True, False])
def test_a_busy_model_waits_briefly_for_the_callers_its_batch_set_free(
        served_repo: Path, returns: bool) -> None:
    """Work-conserving: when a batch of two or more ends with fewer images queued than it
    ran, its thread waits (up to the model's max_queue_delay_s or the batch's compute
    time, if longer, up to four delays) for the callers it just answered to send again,
    so batches keep their size rather than splitting into a small one and a straggler; a
    caller that does not come back costs only that wait."""
    runner = _slow_lenet(served_repo, seconds=1.0)
    images = np.random.default_rng(3).standard_normal((4, 1, 1, 28, 28)).astype(np.float32)

    async def scenario() -> list[list[np.ndarray]]:
        with ThreadPoolExecutor(1) as executor:
            batcher = _started(runner, executor, max_queue_delay_s=0.5)
            first = [asyncio.create_task(batcher.infer({"input": x})) for x in images[:2]]
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 10
            while not runner.sizes:  # the batch of two is running
                assert loop.time() < give_up
                await asyncio.sleep(0.001)
            queued = asyncio.create_task(batcher.infer({"input": images[2]}))
            answers = await asyncio.gather(*first)
            if returns:  # a caller it answered sends again at once
                answers.append(await batcher.infer({"input": images[3]}))
            answers.insert(2, await queued)
            await batcher.close()
            return answers

    answers = asyncio.run(scenario())
    assert runner.sizes == ([2, 2] if returns else [2, 1])
    for x, answer in zip(images, answers, strict=False):
        np.testing.assert_allclose(answer[0], ModelRunner.run(runner, {"input": x})[0],
                                   atol=1e-6)


def test_then_is_told_in_the_batchs_own_callback_and_never_for_a_cancelled_request(
        served_repo: Path) -> None:
    """A caller that awaits nothing (a stream's request) passes `then`: it is called once
    its future holds the answer (outputs, or the deadline's error), before any callback
    of the future's runs, so the answer costs the loop no step of its own; a request
    cancelled in the queue is never run and its `then` never called, and one whose
    `then` fails keeps no other caller of its batch from its answer."""
    runner = _slow_lenet(served_repo, seconds=0.2)
    images = np.random.default_rng(7).standard_normal((3, 1, 1, 28, 28)).astype(np.float32)
    events: list[tuple[str, str, bool]] = []

    async def scenario() -> dict[str, asyncio.Future[list[np.ndarray]]]:
        with ThreadPoolExecutor(1) as executor:
            batcher = _started(runner, executor, max_queue_delay_s=0.0)
            futures: dict[str, asyncio.Future[list[np.ndarray]]] = {}

            def tell(name: str) -> None:
                events.append(("then", name, futures[name].done()))
                if name == "broken":
                    raise RuntimeError("a caller's callback failed")

            def submit(name: str, x: np.ndarray, deadline: float | None = None) -> None:
                future = batcher.submit({"input": x}, 1, time.monotonic(), deadline,
                                        then=lambda: tell(name))
                assert isinstance(future, asyncio.Future)
                future.add_done_callback(lambda f: events.append(("callback", name, True)))
                futures[name] = future

            submit("first", images[0])
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 10
            while not runner.sizes:  # the model is busy: the rest queue
                assert loop.time() < give_up
                await asyncio.sleep(0.001)
            submit("broken", images[2])
            submit("second", images[1])
            submit("cancelled", images[2])
            submit("late", images[2], deadline=time.monotonic() - 1.0)
            futures["cancelled"].cancel()
            while sum(kind == "callback" for kind, _, _ in events) < 5:
                assert loop.time() < give_up, events
                await asyncio.sleep(0.001)
            await batcher.close()
            return futures

    futures = asyncio.run(scenario())
    told = [(name, done) for kind, name, done in events if kind == "then"]
    assert sorted(told) == [("broken", True), ("first", True), ("late", True),
                            ("second", True)]
    for name in ("first", "broken", "second", "late"):
        assert events.index(("then", name, True)) < events.index(("callback", name, True))
    assert runner.sizes == [1, 2]
    for name, x in (("first", images[0]), ("broken", images[2]), ("second", images[1])):
        np.testing.assert_allclose(futures[name].result()[0],
                                   ModelRunner.run(runner, {"input": x})[0], atol=1e-6)
    error = futures["late"].exception()
    assert isinstance(error, ServingError) and error.status is Status.DEADLINE_EXCEEDED
    assert futures["cancelled"].cancelled()
