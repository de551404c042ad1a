"""`cnnserve.v1.Classifier`: images in (encoded files or tensors), labels and probabilities out."""

from __future__ import annotations

import functools

import grpc
import numpy as np

from contract.preprocessing import to_input
from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc as pb_grpc
from service.core import InferenceCore, InferRequest, invalid
from service.engine.models import ServedModel
from service.frontends.grpc_edge import grpc_status
from service.frontends.images import ImageError, decode

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


def _inputs(request: pb.PredictRequest, max_pixels: int, model: ServedModel) -> np.ndarray:
    """Every image of the request as one float32 NCHW batch, in request order."""
    if not request.images:
        invalid("the request holds no images")
    assert model.metadata is not None
    prep = model.metadata.model.preprocessing
    rows: list[np.ndarray] = []
    for i, image in enumerate(request.images):
        kind = image.WhichOneof("source")
        if kind == "encoded":
            try:
                pixels = decode(image.encoded, prep, max_pixels)
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
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    @grpc_status
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
                      ) -> pb.PredictResponse:
        encoded = sum(len(i.encoded) for i in request.images)
        result = await self.core.infer(InferRequest(
            api="classifier", model=request.model, version=request.version,
            rows=len(request.images),
            prepare=functools.partial(_inputs, request, self.core.limits.max_image_pixels),
            timeout_s=context.time_remaining(), offload=encoded >= _OFFLOAD_BYTES))
        labels = result.model.config.labels
        top_k = min(max(request.top_k, 1), len(labels))
        return pb.PredictResponse(model=result.model.name, version=str(result.model.version),
                                  classifications=_classifications(result.outputs, labels, top_k))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        infos = []
        for model in self.core.models:
            prep = model.metadata.model.preprocessing if model.metadata else None
            infos.append(pb.ModelInfo(
                name=model.name, version=str(model.version), labels=model.config.labels,
                input_shape=model.config.input.shape, mean=prep.mean if prep else (),
                std=prep.std if prep else (), max_batch_size=model.max_batch_size,
                provider=model.provider, ready=model.ready))
        return pb.ListModelsResponse(models=infos)
