"""Dynamic batching, admission and shutdown, observed from outside a real server."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
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
from service.engine.runtime import ModelRunner, Tensor
from service.memory.cuda import DeviceTensor
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


def test_a_lone_request_runs_at_once_and_requests_batch_while_the_model_is_busy(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    # The default rule; a budget that holds the burst below (the next tests refuse).
    server = server_factory(served_repo, "--max-queue-delay-us", "3000000",
                            "--latency-budget-ms", "60000")
    stub = stub_for(server)
    images = np.random.default_rng(1).standard_normal((64, 16, 1, 64, 64)).astype(np.float32)
    before = server.metrics()
    for x in np.random.default_rng(2).standard_normal((3, 1, 1, 28, 28)).astype(np.float32):
        stub.ModelInfer(request(x), timeout=30)
    after = server.metrics()
    waited = (metric(after, "cnnserve_queue_wait_seconds_sum")
              - metric(before, "cnnserve_queue_wait_seconds_sum"))
    assert waited < 1.0, "a lone request waited for company on an idle model"  # delay: 3 s
    assert re.search(r'cnnserve_batches_total\{model="lenet",reason="target",version="1"\} 3',
                     after), "a lone request did not leave as a batch of its own"
    before = after
    # One burst of 16-image requests, all on the wire before the first is answered, so the
    # model is busy while they arrive.
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

    def run(self, inputs: Mapping[str, Tensor]) -> list[np.ndarray]:
        self.calls += 1
        self.started[min(self.calls, 2) - 1].set()
        if self.calls == 1:
            assert self.loop_blocked.wait(10), "the test never blocked its loop"
        return super().run(inputs)


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
            policy = BatchPolicy(max_batch_size=4, rule="budget", budget_s=60.0,
                                 max_queue_delay_s=10.0, preferred_batch_sizes=frozenset(),
                                 max_queue_size=8, instances=1)
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


class _HeldRunner(ModelRunner):
    """A real runner that holds each run until the test lets it end."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.entered = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.left = threading.Semaphore(0)

    def run(self, inputs: Mapping[str, Tensor]) -> list[np.ndarray]:
        self.entered.release()
        assert self.release.acquire(timeout=10), "the test never let the run end"
        try:
            return super().run(inputs)
        finally:
            self.left.release()


_DIGIT = np.zeros((1, 1, 28, 28), np.float32)
Teach = Callable[[DynamicBatcher, _HeldRunner, ThreadPoolExecutor], Awaitable[None]]


def _while_busy(served_repo: Path, budget_s: float, teach: Teach
                ) -> tuple[ServingError | None, list[np.ndarray]]:
    """A LeNet batcher with `budget_s`, taught by `teach`; then, while a run holds the
    model, what a new request gets (its refusal, None if taken), and once the model is
    idle again, the answer to the next one."""
    path = latest_model_file(served_repo, "lenet")
    runner = _HeldRunner(path, EngineOptions(repo=served_repo),
                         serving_config(served_repo, "lenet", path))

    async def scenario() -> tuple[ServingError | None, list[np.ndarray]]:
        with ThreadPoolExecutor(1) as executor:
            policy = BatchPolicy(max_batch_size=4, rule="budget", budget_s=budget_s,
                                 max_queue_delay_s=0.0, preferred_batch_sizes=frozenset(),
                                 max_queue_size=8, instances=1)
            batcher = DynamicBatcher("lenet", [runner], executor, policy,
                                     metrics=Metrics(CollectorRegistry()), stats=ModelStats())
            batcher.start()
            await teach(batcher, runner, executor)
            loop = asyncio.get_running_loop()
            running = asyncio.create_task(batcher.infer({"input": _DIGIT}))
            assert await loop.run_in_executor(None, runner.entered.acquire, True, 10)
            try:
                await batcher.infer({"input": _DIGIT})
                refusal = None
            except ServingError as exc:
                refusal = exc
            runner.release.release()
            await asyncio.wait_for(running, 10)
            runner.release.release()
            taken = await asyncio.wait_for(batcher.infer({"input": _DIGIT}), 10)
            await batcher.close()
            return refusal, taken

    return asyncio.run(scenario())


def test_a_lagging_event_loop_counts_against_the_budget(served_repo: Path) -> None:
    """Past the loop's capacity the model's queue is short, yet every answer waits for
    the loop: the margin learnt from those answers refuses a request that would miss its
    budget, and once the model is idle again, the next one is taken."""

    async def stall_after_each_answer(batcher: DynamicBatcher, runner: _HeldRunner,
                                      executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(30):
            call = asyncio.create_task(batcher.infer({"input": _DIGIT}))
            assert await loop.run_in_executor(None, runner.entered.acquire, True, 10)
            runner.release.release()
            assert runner.left.acquire(timeout=10)
            stalled = time.monotonic() + 0.050
            while time.monotonic() < stalled:  # the loop busy with other calls' work
                pass
            await asyncio.wait_for(call, 10)

    refusal, taken = _while_busy(served_repo, 0.05, stall_after_each_answer)
    assert refusal is not None, "a request the loop would answer late was taken"
    assert refusal.status == Status.RESOURCE_EXHAUSTED
    assert "latency budget of 50.0 ms" in str(refusal)
    late = re.search(r"([\d.]+) ms of it because answers came that much later", str(refusal))
    assert late and float(late[1]) > 40, str(refusal)
    assert taken[0].shape == (1, 10)


def test_answers_later_than_estimated_count_against_the_budget(served_repo: Path) -> None:
    """What admission's estimate cannot see, here a compute thread shared with another
    model's 50 ms runs, makes answers late; the margin learnt from them refuses a request
    the estimate alone would take."""

    async def share_the_thread(batcher: DynamicBatcher, runner: _HeldRunner,
                               executor: ThreadPoolExecutor) -> None:
        for _ in range(30):
            executor.submit(time.sleep, 0.050)  # the other model's run, ahead of ours
            runner.release.release()
            await asyncio.wait_for(batcher.infer({"input": _DIGIT}), 10)

    refusal, taken = _while_busy(served_repo, 0.04, share_the_thread)
    assert refusal is not None, "a request answers come late for was taken"
    assert refusal.status == Status.RESOURCE_EXHAUSTED
    late = re.search(r"([\d.]+) ms of it because answers came that much later", str(refusal))
    assert late and float(late[1]) > 40, str(refusal)
    assert taken[0].shape == (1, 10)


def test_a_batch_whose_rows_cannot_be_copied_out_fails_alone(served_repo: Path) -> None:
    """An input left in CUDA shared memory is copied out as its batch is made; if that
    copy fails, that batch's requests get INTERNAL and the model keeps serving."""
    path = latest_model_file(served_repo, "lenet")
    runner = ModelRunner(path, EngineOptions(repo=served_repo),
                         serving_config(served_repo, "lenet", path))
    x = np.zeros((1, 1, 28, 28), np.float32)

    def lost() -> np.ndarray:
        raise ServingError(Status.INVALID_ARGUMENT, "cudaMemcpy failed: the device is lost")

    async def scenario() -> list[object]:
        with ThreadPoolExecutor(1) as executor:
            policy = BatchPolicy(max_batch_size=2, rule="delay", budget_s=None,
                                 max_queue_delay_s=0.05, preferred_batch_sizes=frozenset(),
                                 max_queue_size=8, instances=1)
            batcher = DynamicBatcher("lenet", [runner], executor, policy,
                                     metrics=Metrics(CollectorRegistry()), stats=ModelStats())
            batcher.start()
            device = DeviceTensor(0, 0, x.dtype, x.shape, lost)
            together = await asyncio.wait_for(asyncio.gather(
                batcher.infer({"input": device}), batcher.infer({"input": x}),
                return_exceptions=True), 30)
            after = await asyncio.wait_for(batcher.infer({"input": x}), 30)
            await batcher.close()
            return [*together, after]

    failed, beside, after = asyncio.run(scenario())
    for refused in (failed, beside):
        assert isinstance(refused, ServingError) and refused.status == Status.INTERNAL
        assert "the device is lost" in str(refused)
    assert isinstance(after, list) and after[0].shape == (1, 10)


def _accelerator_repo(served_repo: Path, into: Path, **config: object) -> Path:
    """LeNet's folder served as the accelerator-shaped test backend, with `config` over
    its config.json."""
    shutil.copytree(served_repo / "lenet", into / "accel")
    path = into / "accel" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "name": "accel",
                                "platform": "simulated_accelerator", **config}))
    return into


async def _poisson(address: str, rate: float, count: int, seed: int
                   ) -> list[grpc.StatusCode]:
    """`count` single-image requests as a Poisson process at `rate`: each sent on its
    schedule whatever the answers before it, as MLPerf's Server scenario sends them."""
    gaps = np.random.default_rng(seed).exponential(1 / rate, count)
    message = request(np.zeros((1, 1, 28, 28), np.float32), "accel")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelReady(service_pb2.ModelReadyRequest(name="accel"), timeout=10)

        async def one() -> grpc.StatusCode:
            try:
                await stub.ModelInfer(message, timeout=30)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        loop = asyncio.get_running_loop()
        start, calls = loop.time(), []
        for at in np.cumsum(gaps):
            await asyncio.sleep(max(start + float(at) - loop.time(), 0.0))  # the schedule
            calls.append(asyncio.create_task(one()))
        return list(await asyncio.gather(*calls))


def test_on_an_accelerator_shaped_model_batches_fill_toward_the_budget_as_the_rate_grows(
        served_repo: Path, tmp_path: Path, server_factory: Callable[..., ServerProcess]
        ) -> None:
    """10 ms a launch and 0.2 ms an image, as a GPU: one image alone takes 10.2 ms, so
    at 800 images/s only batches keep up, and the batcher forms them."""
    repo = _accelerator_repo(served_repo, tmp_path, simulated_launch_us=10_000,
                             simulated_per_image_us=200, latency_budget_ms=50)
    server = server_factory(repo)
    stub = stub_for(server)
    stub.ModelInfer(request(np.zeros((1, 1, 28, 28), np.float32), "accel"), timeout=30)
    text = server.metrics()
    assert metric(text, "cnnserve_latency_budget_seconds", "accel") == 0.05
    assert 0.0102 <= metric(text, "cnnserve_batch_cost_seconds", "accel") / 32 < 1
    before = server.metrics()
    for rate, count in ((100, 100), (800, 800)):
        codes = asyncio.run(_poisson(server.address, rate, count, seed=rate))
        # Well within capacity; a host too busy to answer in time refuses a few.
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert codes.count(grpc.StatusCode.OK) == count - refused and refused <= count // 20
        after = server.metrics()
        images = (metric(after, "cnnserve_batch_size_sum", "accel")
                  - metric(before, "cnnserve_batch_size_sum", "accel"))
        batches = (metric(after, "cnnserve_batch_size_count", "accel")
                   - metric(before, "cnnserve_batch_size_count", "accel"))
        assert images == count - refused
        if rate == 100:
            slow = images / batches
        else:
            fast = images / batches
        before = after
    assert 1 <= slow < 4 and fast > 8 and fast > 2 * slow, (slow, fast)
    reasons = dict(re.findall(r'cnnserve_batches_total\{model="accel",reason="(\w+)",'
                              r'version="1"\} (\S+)', before))
    assert set(reasons) <= {"target", "budget", "full"} and float(reasons["target"]) > 0


def test_past_capacity_requests_that_cannot_meet_the_budget_are_refused_at_once(
        served_repo: Path, tmp_path: Path, server_factory: Callable[..., ServerProcess]
        ) -> None:
    """Four images per 10.8 ms run at most, 30 ms to answer: a burst of 128 cannot all be
    answered in time, so the server takes what it can answer and refuses the rest at
    once, saying why, rather than serving them late."""
    repo = _accelerator_repo(served_repo, tmp_path, max_batch_size=4,
                             preferred_batch_sizes=[4], latency_budget_ms=30)
    server = server_factory(repo)
    stub = stub_for(server)
    x = np.zeros((1, 1, 28, 28), np.float32)
    stub.ModelInfer(request(x, "accel"), timeout=30)
    finished: list[str] = []
    lock = threading.Lock()

    def done(call: grpc.Future) -> None:
        with lock:
            finished.append("OK" if call.exception() is None else call.code().name)

    calls = [stub.ModelInfer.future(request(x, "accel"), timeout=30) for _ in range(128)]
    for call in calls:
        call.add_done_callback(done)
    refused = []
    for call in calls:
        try:
            assert logits(call.result()).shape == (1, 10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "cannot answer within its latency budget of 30.0 ms" in exc.details()
            refused.append(exc)
    assert 64 <= len(refused) < 128
    wait_until(lambda: len(finished) == 128)
    # A request is refused only while the queue holds more than its budget's worth of
    # work, so every refusal comes back before that work is done: the last is an answer.
    assert finished[-1] == "OK", "a refusal waited for the queue: not at once"
    text = server.metrics()
    assert metric(text, "cnnserve_budget_refusals_total", "accel") == len(refused)
    assert metric(text, "cnnserve_inferences_total", "accel") == 1 + 128 - len(refused)
    assert metric(text, "cnnserve_queue_depth", "accel") == 0
