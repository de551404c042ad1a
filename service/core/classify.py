"""Classification, whatever protocol asked for it: encoded images (or ready tensors) in,
labels and probabilities out. Both the gRPC Classifier API and REST's classify and v1
predict routes translate to these types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from contract.preprocessing import to_input
from service.core.admission import Call
from service.core.images import Header, ImageError, decode, open_header
from service.core.inference import InferenceCore, InferRequest
from service.engine.models import ServedModel
from service.engine.runtime import Tensors
from service.status import ServingError, Status, invalid


@dataclass(frozen=True)
class DecodeLimits:
    max_image_pixels: int
    max_decode_cost: int
    """Weighted pixels (images.DECODE_WEIGHT) one request may decode."""


@dataclass(slots=True)
class ImageTensor:
    """An image already preprocessed by the client: the model's input shape, float32."""

    shape: Sequence[int]
    data: Sequence[float]


Image = bytes | ImageTensor | None
"""Encoded file bytes, a ready tensor, or None where the client set neither."""


@dataclass(slots=True)
class Prediction:
    label: str
    index: int
    probability: float


@dataclass(slots=True)
class Classified:
    model: str
    version: str
    classifications: list[list[Prediction]]
    """Per image, in request order: the top_k predictions, most probable first."""


@dataclass(slots=True)
class ImagesPayload:
    """The request's images, decoded in the decode pool when any is encoded."""

    images: Sequence[Image]
    limits: DecodeLimits

    @property
    def rows(self) -> int:
        return len(self.images)

    @property
    def offload(self) -> bool:
        return any(isinstance(i, bytes) for i in self.images)

    def tensors(self, model: ServedModel, call: Call) -> Tensors:
        return dict(image_batch(self.images, self.limits, model, call).items())


def _tensor(image: ImageTensor, index: int, model: ServedModel) -> np.ndarray:
    expected = model.config.inputs[0].shape
    if tuple(image.shape) != expected:
        invalid(f"image {index}: tensor shape must be {list(expected)}, got {list(image.shape)}")
    if len(image.data) != int(np.prod(expected)):
        invalid(f"image {index}: tensor of shape {list(expected)} needs {int(np.prod(expected))} "
                f"values, got {len(image.data)}")
    values = np.asarray(image.data, dtype=np.float32)
    if not np.isfinite(values).all():
        invalid(f"image {index}: the tensor holds NaN or infinite values")
    return values.reshape(expected)


def image_batch(images: Sequence[Image], limits: DecodeLimits, model: ServedModel, call: Call
                ) -> dict[str, np.ndarray]:
    """Every image as one float32 NCHW batch, in request order.

    Every header is read and the whole request costed before any pixel is decoded;
    between images it stops if the caller has gone.
    """
    if model.metadata is None:
        raise ServingError(Status.FAILED_PRECONDITION,
                           f"model {model.name!r} was not exported by this project: it has no "
                           "labels or preprocessing to classify images with; call it through "
                           "the inference protocol (ModelInfer)")
    if not images:
        invalid("the request holds no images")
    prep = model.metadata.model.preprocessing
    sources: list[Header | np.ndarray] = []
    for i, image in enumerate(images):
        if isinstance(image, bytes):
            try:
                sources.append(open_header(image, limits.max_image_pixels))
            except ImageError as exc:
                invalid(f"image {i}: {exc}")
        elif isinstance(image, ImageTensor):
            sources.append(_tensor(image, i, model))
        else:
            invalid(f"image {i}: set either encoded or tensor")
    headers = [s for s in sources if isinstance(s, Header)]
    cost = sum(h.cost for h in headers)
    if cost > limits.max_decode_cost:
        invalid(f"decoding these {len(headers)} images would cost {cost} weighted pixels; a "
                f"request may decode {limits.max_decode_cost} (WebP counts 4 a pixel, PNG, "
                "GIF and TIFF 2, JPEG and BMP 1)")
    if headers:  # decoded one at a time: the widest image is the peak
        call.charge(max(h.decoded_bytes(prep.channels) for h in headers), "decoding the images")
    rows: list[np.ndarray] = []
    for i, source in enumerate(sources):
        if call.stopped:
            raise ServingError(Status.CANCELLED, "the call ended while its images were decoded")
        if isinstance(source, Header):
            try:
                rows.append(to_input(decode(source, prep)[None], prep)[0])
            except ImageError as exc:
                invalid(f"image {i}: {exc}")
        else:
            rows.append(source)
    return {model.config.inputs[0].name: np.stack(rows)}


def top_predictions(logits: np.ndarray, labels: Sequence[str], top_k: int
                    ) -> list[list[Prediction]]:
    """Softmax over each row of logits, then its `top_k` classes, most probable first
    (ties in class order). Probabilities are float32, as the protocols carry them, in
    their shortest decimal form (as protobuf's JSON writes them)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    single = probs.astype(np.float32)
    return [[Prediction(labels[j], int(j), float(str(row[j]))) for j in top]
            for row, top in zip(single, order, strict=True)]


class Classifier:
    """Classify images on a model exported by this project."""

    def __init__(self, core: InferenceCore, limits: DecodeLimits) -> None:
        self.core = core
        self.limits = limits

    async def classify(self, model: str, version: str, images: Sequence[Image], top_k: int,
                       api: str, timeout_s: float | None, call: Call | None = None
                       ) -> Classified:
        """`top_k` is clamped to 1..the model's number of labels."""
        result = await self.core.infer(InferRequest(
            api=api, model=model, version=version,
            payload=ImagesPayload(images, self.limits), timeout_s=timeout_s, call=call))
        labels = result.model.config.labels
        top = min(max(top_k, 1), len(labels))
        return Classified(result.model.name, str(result.model.version),
                          top_predictions(result.outputs[0], labels, top))

    def models(self) -> list[ServedModel]:
        """The models that classify (exported by this project), and any not ready."""
        return [m for m in self.core.models if not (m.ready and m.metadata is None)]
