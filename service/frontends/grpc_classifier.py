"""`cnnserve.v1.Classifier`: images in (encoded files or tensors), labels and probabilities out."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc
import numpy as np

from contract.preprocessing import to_input
from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc as pb_grpc
from service.core.admission import Call
from service.core.images import Header, ImageError, decode, open_header
from service.core.inference import InferenceCore, InferRequest, ServingError, Status, invalid
from service.engine.models import ServedModel
from service.engine.runtime import Tensors


@dataclass(frozen=True)
class DecodeLimits:
    max_image_pixels: int
    max_decode_cost: int
    """Weighted pixels (images.DECODE_WEIGHT) one request may decode."""


def _tensor(image: pb.Tensor, index: int, model: ServedModel) -> np.ndarray:
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


def _inputs(request: pb.PredictRequest, limits: DecodeLimits, model: ServedModel, call: Call
            ) -> Tensors:
    """Every image of the request as one float32 NCHW batch, in request order.

    Runs in the decode pool. Every header is read and the whole request costed before
    any pixel is decoded; between images it stops if the caller has gone.
    """
    if model.metadata is None:
        raise ServingError(Status.FAILED_PRECONDITION,
                           f"model {model.name!r} was not exported by this project: it has no "
                           "labels or preprocessing to classify images with; call it through "
                           "the inference protocol (ModelInfer)")
    if not request.images:
        invalid("the request holds no images")
    prep = model.metadata.model.preprocessing
    sources: list[Header | np.ndarray] = []
    for i, image in enumerate(request.images):
        kind = image.WhichOneof("source")
        if kind == "encoded":
            try:
                sources.append(open_header(image.encoded, limits.max_image_pixels))
            except ImageError as exc:
                invalid(f"image {i}: {exc}")
        elif kind == "tensor":
            sources.append(_tensor(image.tensor, i, model))
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


def _classifications(logits: np.ndarray, labels: tuple[str, ...], top_k: int
                     ) -> list[pb.Classification]:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return [pb.Classification(predictions=[
        pb.Prediction(label=labels[j], index=int(j), probability=float(row[j])) for j in top])
        for row, top in zip(probs, order, strict=True)]


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, core: InferenceCore, limits: DecodeLimits) -> None:
        self.core = core
        self.limits = limits

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
                      ) -> pb.PredictResponse:
        return await self.predict(request, "classifier", context.time_remaining())

    async def predict(self, request: pb.PredictRequest, api: str, timeout_s: float | None
                      ) -> pb.PredictResponse:
        """Classify the request's images; shared by the gRPC and REST bindings."""
        encoded = any(i.WhichOneof("source") == "encoded" for i in request.images)
        result = await self.core.infer(InferRequest(
            api=api, model=request.model, version=request.version,
            rows=len(request.images), prepare=functools.partial(_inputs, request, self.limits),
            timeout_s=timeout_s, offload=encoded))
        labels = result.model.config.labels
        top_k = min(max(request.top_k, 1), len(labels))
        return pb.PredictResponse(model=result.model.name, version=str(result.model.version),
                                  classifications=_classifications(result.outputs[0], labels,
                                                                   top_k))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        infos = []
        for model in self.core.models:
            if model.ready and model.metadata is None:
                continue  # not a classifier
            prep = model.metadata.model.preprocessing if model.metadata else None
            infos.append(pb.ModelInfo(
                name=model.name, version=str(model.version), labels=model.config.labels,
                input_shape=model.config.inputs[0].shape, mean=prep.mean if prep else (),
                std=prep.std if prep else (), max_batch_size=model.max_batch_size,
                provider=model.provider, ready=model.ready))
        return pb.ListModelsResponse(models=infos)
