"""`cnnserve.v1.Classifier` over gRPC: its messages to the core's classifier and back."""

from __future__ import annotations

import grpc

from protos import classifier_pb2 as pb
from service.core.admission import Call
from service.core.classify import Classified, Classifier, Image, ImageTensor


def images(request: pb.PredictRequest) -> list[Image]:
    found: list[Image] = []
    for image in request.images:
        kind = image.WhichOneof("source")
        if kind == "encoded":
            found.append(image.encoded)
        elif kind == "tensor":
            found.append(ImageTensor(image.tensor.shape, image.tensor.data))
        else:
            found.append(None)
    return found


def predict_response(answer: Classified) -> pb.PredictResponse:
    return pb.PredictResponse(model=answer.model, version=answer.version, classifications=[
        pb.Classification(predictions=[
            pb.Prediction(label=p.label, index=p.index, probability=p.probability)
            for p in predictions]) for predictions in answer.classifications])


class ClassifierServicer:
    """Registered with the generated `add_ClassifierServicer_to_server`; the edge hands
    each method the call it admitted."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext,
                      call: Call) -> pb.PredictResponse:
        return predict_response(await self.classifier.classify(
            request.model, request.version, images(request), request.top_k, "classifier",
            context.time_remaining(), call))

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext, call: Call
                         ) -> pb.ListModelsResponse:
        infos = []
        for model in self.classifier.models():
            prep = model.metadata.model.preprocessing if model.metadata else None
            infos.append(pb.ModelInfo(
                name=model.name, version=str(model.version), labels=model.config.labels,
                input_shape=model.config.inputs[0].shape, mean=prep.mean if prep else (),
                std=prep.std if prep else (), max_batch_size=model.max_batch_size,
                provider=model.provider, ready=model.ready))
        return pb.ListModelsResponse(models=infos)
