"""The inference core in-process, on real sessions and batchers: what no client can time."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.app.settings import ServiceSettings
from service.core.admission import Call
from service.core.inference import InferenceCore, InferRequest, RequestLimits, ServingError, Status
from service.engine.models import ModelSet, ServedModel, load_model
from service.engine.runtime import Tensors
from service.observability.metrics import Metrics

LIMITS = RequestLimits(max_images_per_request=256, request_timeout_s=30)


def served(repo: Path, executor: ThreadPoolExecutor, metrics: Metrics,
           max_batch_size: int) -> ServedModel:
    settings = ServiceSettings(repo=repo, device="cpu", intra_op_threads=1, warmup=False,
                               max_batch_size=max_batch_size, max_queue_delay_us=0)
    model = load_model(settings, "lenet", executor, metrics)
    assert model.batcher is not None, model.reason
    model.batcher.start()
    return model


@pytest.mark.parametrize(("rows", "outcome"), [(2, Status.OK), (8, Status.INVALID_ARGUMENT)])
def test_a_request_a_hot_reload_redirects_is_checked_against_the_version_that_runs_it(
        served_repo: Path, rows: int, outcome: Status) -> None:
    """The request found version A (max batch 8); while its images were decoded, A was
    retired for B (max batch 4). It runs on B, or is refused as B's caller would be,
    never counted as a server fault."""
    metrics = Metrics(CollectorRegistry())
    rows_asked = rows
    decoding, swapped = threading.Event(), threading.Event()
    prepared_for: list[ServedModel] = []

    class Slow:
        """Zeros for the model it is prepared for, once the test has swapped the model."""

        offload = True
        rows = rows_asked

        def tensors(self, model: ServedModel, call: Call) -> Tensors:
            prepared_for.append(model)
            decoding.set()
            assert swapped.wait(10), "the test never swapped the model"
            (spec,) = model.config.inputs
            return {spec.name: np.zeros((rows_asked, *spec.shape), np.float32)}

    async def scenario() -> tuple[ServedModel, ServedModel, InferenceCore,
                                  Status | np.ndarray, ServedModel | None]:
        with ThreadPoolExecutor(4) as executor:
            old = served(served_repo, executor, metrics, max_batch_size=8)
            new = served(served_repo, executor, metrics, max_batch_size=4)
            models = ModelSet([old])
            core = InferenceCore(models, metrics, LIMITS, executor)
            call = asyncio.create_task(core.infer(InferRequest(
                api="oip", model="lenet", version="", payload=Slow(), timeout_s=None,
                call=None)))
            assert await asyncio.to_thread(decoding.wait, 10)
            models.put(new)  # what hot reload does: swap, then retire the old version
            assert old.batcher is not None
            await old.batcher.close()
            swapped.set()
            try:
                result = await call
                answer: Status | np.ndarray = result.outputs[0]
                ran_on: ServedModel | None = result.model
            except ServingError as exc:
                answer, ran_on = exc.status, None
            await models.close()
            return old, new, core, answer, ran_on

    old, new, core, answer, ran_on = asyncio.run(scenario())
    assert core.in_flight == 0
    if outcome is Status.OK:
        assert isinstance(answer, np.ndarray) and answer.shape == (rows, 10)
        assert ran_on is new
        assert prepared_for == [old, new]  # prepared again for the version that ran it
        assert (new.stats.success.count, old.stats.success.count) == (1, 0)
    else:
        assert answer is outcome
        assert prepared_for == [old]  # refused before decoding anything for B
        assert new.stats.fail.count == 1


def test_a_model_not_ready_is_unavailable_with_its_reason(served_repo: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    settings = ServiceSettings(repo=served_repo, device="cpu", warmup=False)
    with ThreadPoolExecutor(1) as executor:
        model = load_model(settings, "lenet", executor, metrics)
        model.reason = "damaged file"
        core = InferenceCore(ModelSet([model]), metrics, LIMITS, executor)
        with pytest.raises(ServingError) as err:
            core.model("lenet")
    assert err.value.status is Status.UNAVAILABLE
    assert "not ready: damaged file" in str(err.value)
