"""`cnnserve.v1.Classifier`: images in (encoded files or tensors), labels and probabilities out."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc as pb_grpc
from service.dispatch import (
    Call,
    RequestLimits,
    answer,
    check_image_count,
    find_model,
    infer,
    invalid,
)
from service.images import ImageError, decode
from service.metrics import Metrics
from service.models import ModelSet, ServedModel
from training.preprocessing import to_input

# Decoding this many encoded bytes or more moves off the event loop.
_OFFLOAD_BYTES = 256 * 1024


def _tensor(image: pb.Tensor, index: int, model: ServedModel) -> np.ndarray:
    expected = model.config.input.shape
    if tuple(image.shape) != expected:
        invalid(f"image {index}: tensor shape must be {list(expected)}, got {list(image.shape)}")
    if len(image.data) != int(np.prod(expected)):
        invalid(f"image {index}: tensor of shape {list(expected)} needs {int(np.prod(expected))} "
                f"values, got {len(image.data)}")
    return np.asarray(image.data, dtype=np.float32).reshape(expected)


def _inputs(request: pb.PredictRequest, model: ServedModel, limits: RequestLimits
            ) -> np.ndarray:
    """Every image of the request as one float32 NCHW batch, in request order."""
    if not request.images:
        invalid("the request holds no images")
    check_image_count(model, len(request.images), limits)
    assert model.metadata is not None
    prep = model.metadata.model.preprocessing
    rows: list[np.ndarray] = []
    for i, image in enumerate(request.images):
        kind = image.WhichOneof("source")
        if kind == "encoded":
            try:
                pixels = decode(image.encoded, prep, limits.max_image_pixels)
                rows.append(to_input(pixels[None], prep)[0])
            except ImageError as exc:
                invalid(f"image {i}: {exc}")
        elif kind == "tensor":
            rows.append(_tensor(image.tensor, i, model))
        else:
            invalid(f"image {i}: set either encoded or tensor")
    return np.stack(rows)


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
    def __init__(self, models: ModelSet, metrics: Metrics, limits: RequestLimits) -> None:
        self.models = models
        self.metrics = metrics
        self.limits = limits

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
                      ) -> pb.PredictResponse:
        async def handle(call: Call) -> pb.PredictResponse:
            call.model = model = find_model(self.models, request.model, request.version)
            encoded = sum(len(i.encoded) for i in request.images)
            if encoded >= _OFFLOAD_BYTES:
                inputs = await asyncio.to_thread(_inputs, request, model, self.limits)
            else:
                inputs = _inputs(request, model, self.limits)
            logits = await infer(call, self.models, inputs, context, self.limits)
            model = call.model or model
            labels = model.config.labels
            top_k = min(max(request.top_k, 1), len(labels))
            return pb.PredictResponse(model=model.name, version=str(model.version),
                                      classifications=_classifications(logits, labels, top_k))
        return await answer(self.metrics, "classifier", context, handle)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        infos = []
        for model in sorted(self.models.models.values(), key=lambda m: m.name):
            prep = model.metadata.model.preprocessing if model.metadata else None
            infos.append(pb.ModelInfo(
                name=model.name, version=str(model.version), labels=model.config.labels,
                input_shape=model.config.input.shape, mean=prep.mean if prep else (),
                std=prep.std if prep else (), max_batch_size=model.max_batch_size,
                provider=model.provider, ready=model.ready))
        return pb.ListModelsResponse(models=infos)
