"""The typed classifier API: PNG/JPEG bytes or tensors in, labels and probabilities out."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from contract.datasets import Dataset
from contract.metadata import Preprocessing
from contract.preprocessing import resize_images, to_input
from contract.repository import REPORT_FILE
from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc as pb_grpc
from tests.conftest import TINY_CONFIGS
from tests.servers import ServerProcess


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> pb_grpc.ClassifierStub:
    return pb_grpc.ClassifierStub(grpc.insecure_channel(server.address))


def predict(stub: pb_grpc.ClassifierStub, model: str, images: list[pb.Image], top_k: int = 1
            ) -> pb.PredictResponse:
    return stub.Predict(pb.PredictRequest(model=model, images=images, top_k=top_k), timeout=60)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_png_test_split_reaches_the_accuracy_the_export_promised(
        stub: pb_grpc.ClassifierStub, served_repo: Path, mnist5k: Dataset, name: str) -> None:
    report = json.loads((served_repo / name / "1" / REPORT_FILE).read_text())
    promised = report["variants"][0]["parity"][0]["accuracy"]
    encoded = [png(img) for img in mnist5k.test.images]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(
            lambda i: predict(stub, name, [pb.Image(encoded=e) for e in encoded[i:i + 25]]),
            range(0, len(encoded), 25)))
    predicted = [c.predictions[0].index for r in responses for c in r.classifications]
    assert len(predicted) == 500
    accuracy = float(np.mean(np.array(predicted) == mnist5k.test.labels))
    assert accuracy == pytest.approx(promised, abs=1e-9)


def test_colour_jpeg_of_any_size_is_converted_like_training(
        stub: pb_grpc.ClassifierStub, mnist5k: Dataset) -> None:
    digit = mnist5k.test.images[0][..., 0]
    big = Image.fromarray(digit).resize((90, 70)).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    response = predict(stub, "vgg11_bn", [pb.Image(encoded=buf.getvalue())], top_k=3)
    (classification,) = response.classifications
    assert len(classification.predictions) == 3
    probs = [p.probability for p in classification.predictions]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_tensor_input_matches_the_encoded_path(stub: pb_grpc.ClassifierStub,
                                               mnist5k: Dataset) -> None:
    info = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    alex = info["alexnet"]
    assert alex.ready and alex.provider == "CPUExecutionProvider"
    assert list(alex.input_shape) == [1, 64, 64] and list(alex.labels) == list("0123456789")
    prep = Preprocessing(color="L", height=64, width=64, mean=tuple(alex.mean),
                         std=tuple(alex.std))
    image = mnist5k.test.images[:1]
    tensor = to_input(resize_images(image, "L", 64, 64), prep)[0]
    response = predict(stub, "alexnet", [
        pb.Image(encoded=png(image[0])),
        pb.Image(tensor=pb.Tensor(shape=[1, 64, 64], data=tensor.ravel().tolist()))], top_k=10)
    by_png, by_tensor = ([p.probability for p in sorted(c.predictions, key=lambda p: p.index)]
                         for c in response.classifications)
    np.testing.assert_allclose(by_png, by_tensor, rtol=1e-4, atol=1e-6)
    assert sum(by_png) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("images", "message"), [
    ([], "no images"),
    ([pb.Image(encoded=b"not an image at all")],
     r"image 0: 19 bytes that are not an image in a supported format \(PNG, JPEG"),
    ([pb.Image()], "image 0: set either encoded or tensor"),
    ([pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=[0.0] * 10))],
     "needs 784 values, got 10"),
    ([pb.Image(tensor=pb.Tensor(shape=[3, 28, 28]))],
     r"tensor shape must be \[1, 28, 28\], got \[3, 28, 28\]"),
    ([pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=[0.0] * 784))] * 33,
     "at most 32 images per request"),
])
def test_bad_images_get_invalid_argument(stub: pb_grpc.ClassifierStub, images: list[pb.Image],
                                         message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        predict(stub, "lenet", images)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, err.value.details()), err.value.details()
    assert " at 0x" not in err.value.details()  # no Python reprs


def test_decompression_bomb_is_refused_from_its_header(stub: pb_grpc.ClassifierStub) -> None:
    buf = io.BytesIO()
    Image.new("L", (5000, 4000)).save(buf, format="PNG")  # 20 Mpx in a few KB
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(grpc.RpcError) as err:
        predict(stub, "lenet", [pb.Image(encoded=buf.getvalue())])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "5000x4000 = 20000000 pixels; the limit is 16777216" in err.value.details()


def test_bad_requests_do_not_disturb_good_ones_in_the_same_batch(
        stub: pb_grpc.ClassifierStub, mnist5k: Dataset) -> None:
    good = [png(img) for img in mnist5k.test.images[:16]]
    expected = [predict(stub, "lenet", [pb.Image(encoded=g)]).classifications[0]
                .predictions[0].index for g in good]

    def call(i: int) -> int | grpc.StatusCode:
        if i % 2:
            try:
                predict(stub, "lenet", [pb.Image(encoded=b"\x89PNG broken")])
            except grpc.RpcError as exc:
                return exc.code()
            raise AssertionError("a broken PNG was accepted")
        return predict(stub, "lenet", [pb.Image(encoded=good[i // 2])]).classifications[0] \
            .predictions[0].index

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(32)))
    assert results[1::2] == [grpc.StatusCode.INVALID_ARGUMENT] * 16
    assert results[0::2] == expected


def test_unknown_model_is_not_found(stub: pb_grpc.ClassifierStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        predict(stub, "../../etc/passwd", [pb.Image(encoded=b"x")])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "served models: alexnet, lenet, vgg11_bn" in err.value.details()
