"""Classification logic on the core's own types, in-process: what the gRPC Classifier and
REST's classify and v1 predict routes all rely on."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from service.app.settings import ServiceSettings
from service.core.admission import Call, Kind
from service.core.classify import (
    DecodeLimits,
    ImagesPayload,
    ImageTensor,
    image_batch,
    top_predictions,
)
from service.engine.models import ServedModel, load_model
from service.observability.metrics import Metrics
from service.status import ServingError, Status

LIMITS = DecodeLimits(max_image_pixels=4096 * 4096, max_decode_cost=2 * 4096 * 4096)


@pytest.fixture(scope="module")
def lenet(served_repo: Path) -> Iterator[ServedModel]:
    settings = ServiceSettings(repo=served_repo, device="cpu", warmup=False)
    with ThreadPoolExecutor(1) as executor:
        yield load_model(settings, "lenet", executor, Metrics(CollectorRegistry()))


def call() -> Call:
    return Call("classifier", "test", Kind.WORK)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_top_predictions_are_softmax_probabilities_most_probable_first() -> None:
    logits = np.array([[0.0, 2.0, 1.0], [5.0, 5.0, -1.0]], np.float32)
    first, tied = top_predictions(logits, ("a", "b", "c"), 2)
    assert [p.label for p in first] == ["b", "c"]
    expected = np.exp([2.0, 1.0]) / np.exp([0.0, 2.0, 1.0]).sum()
    np.testing.assert_allclose([p.probability for p in first], expected, rtol=1e-6)
    assert [p.index for p in tied] == [0, 1]  # a tie keeps class order
    # float32 values, in their shortest decimal form (as protobuf's JSON writes them)
    assert repr(tied[0].probability) == str(np.float32(tied[0].probability)) == "0.49938107"


def test_a_payload_of_encoded_images_is_decoded_off_the_loop() -> None:
    assert ImagesPayload([b"png", None], LIMITS).offload
    tensors = ImagesPayload([ImageTensor((1, 28, 28), [0.0] * 784)], LIMITS)
    assert (tensors.rows, tensors.offload) == (1, False)


def test_images_become_one_batch_in_request_order(lenet: ServedModel) -> None:
    dark, light = np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8)
    ready = ImageTensor((1, 28, 28), [0.5] * 784)
    batch = image_batch([png(dark), ready, png(light)], LIMITS, lenet, call())["input"]
    assert batch.shape == (3, 1, 28, 28) and batch.dtype == np.float32
    assert batch[0].mean() < batch[2].mean()
    np.testing.assert_array_equal(batch[1], np.full((1, 28, 28), 0.5, np.float32))


@pytest.mark.parametrize(("images", "message"), [
    ([], "holds no images"),
    ([None], "image 0: set either encoded or tensor"),
    ([b"not an image"], "image 0:"),
    ([ImageTensor((28, 28), [0.0] * 784)], "tensor shape must be [1, 28, 28]"),
    ([ImageTensor((1, 28, 28), [0.0])], "needs 784 values, got 1"),
    ([ImageTensor((1, 28, 28), [float("nan")] * 784)], "NaN or infinite"),
])
def test_images_that_cannot_be_classified_are_refused_with_why(
        lenet: ServedModel, images: list[bytes | ImageTensor | None], message: str) -> None:
    with pytest.raises(ServingError) as err:
        image_batch(images, LIMITS, lenet, call())
    assert err.value.status is Status.INVALID_ARGUMENT and message in str(err.value)


def test_the_whole_request_is_costed_before_any_pixel_is_decoded(lenet: ServedModel) -> None:
    big = png(np.zeros((300, 300), np.uint8))
    with pytest.raises(ServingError) as err:
        image_batch([big, big], DecodeLimits(10**6, 300 * 300 * 3), lenet, call())
    assert "would cost 360000 weighted pixels" in str(err.value)


def test_a_model_made_elsewhere_does_not_classify(lenet: ServedModel) -> None:
    foreign = ServedModel("onnx", 1, lenet.config, lenet.policy)
    with pytest.raises(ServingError) as err:
        image_batch([b"x"], LIMITS, foreign, call())
    assert err.value.status is Status.FAILED_PRECONDITION
