"""Locust users for cnnserve: classifier calls with PNG images, OIP calls with raw tensors.

    locust -f loadtests/locustfile.py --host 127.0.0.1:8001                  # web UI, :8089
    locust -f loadtests/locustfile.py --host 127.0.0.1:8001 --headless -u 32 -r 32 -t 30s \
        --csv reports/run --html reports/run.html --model alexnet --images-per-request 8
    locust -f loadtests/locustfile.py --master / --worker --master-host HOST   # distributed
    locust -f loadtests/locustfile.py,loadtests/step_shape.py ...            # stepped load

Options (or LOCUST_MODEL, LOCUST_IMAGES_PER_REQUEST, LOCUST_GRPC_TIMEOUT, ...): --model,
--images-per-request, --grpc-timeout, and for a secured server --grpc-ca-file,
--grpc-cert-file, --grpc-key-file, --grpc-token. Pick one user class by naming it last on the
command line (`... ClassifierUser`); by default both run.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import gevent
import grpc
import numpy as np
from locust import events, task
from locust.env import Environment

from contract.datasets import encode_png, load_dataset
from contract.metadata import Preprocessing
from contract.preprocessing import resize_images, to_input
from loadtests.grpc_user import GrpcUser
from loadtests.report import row_name
from protos import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc

IMAGES = 64  # distinct test images each user cycles through


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--model", default="lenet", env_var="LOCUST_MODEL",
                        help="model to load-test")
    parser.add_argument("--images-per-request", type=int, default=1,
                        env_var="LOCUST_IMAGES_PER_REQUEST")
    parser.add_argument("--grpc-timeout", type=float, default=10.0, env_var="LOCUST_GRPC_TIMEOUT",
                        help="deadline of each call, seconds")
    parser.add_argument("--grpc-ca-file", env_var="LOCUST_GRPC_CA_FILE",
                        help="CA bundle: connect with TLS")
    parser.add_argument("--grpc-cert-file", env_var="LOCUST_GRPC_CERT_FILE",
                        help="client certificate for mutual TLS")
    parser.add_argument("--grpc-key-file", env_var="LOCUST_GRPC_KEY_FILE")
    parser.add_argument("--grpc-token", env_var="LOCUST_GRPC_TOKEN", is_secret=True,
                        help="bearer token sent with every call")


@cache
def test_digits() -> np.ndarray:
    """uint8 (N, 28, 28, 1) held-out mnist5k digits: real images, not noise."""
    return load_dataset("mnist5k").test.images[:IMAGES]


@cache
def png_digits() -> tuple[bytes, ...]:
    return tuple(encode_png(image) for image in test_digits())


@events.init.add_listener
def _load_images(environment: Environment, **kwargs: Any) -> None:
    """Decode and encode the images before any user starts: CPU work in a user's on_start
    would stall every other user's greenlet and inflate their response times."""
    test_digits()
    png_digits()
    # gevent's loop caches the time; after seconds of blocking work, refresh it or the
    # --run-time timer Locust sets next would start in the past and end the test at once.
    gevent.get_hub().loop.update_now()


class _CnnUser(GrpcUser):
    abstract = True

    def options(self) -> tuple[str, int, float]:
        opts = self.environment.parsed_options
        if opts is None:  # run as a library, without Locust's command line
            return "lenet", 1, 10.0
        return opts.model, opts.images_per_request, opts.grpc_timeout

    def on_start(self) -> None:
        self.model, self.per_request, self.timeout = self.options()
        self.row_label = row_name("", self.model, self.per_request)

    def call(self, method: Any, request: Any, timeout: float) -> Any:
        """The interceptor has reported the outcome; a failure must not end the user."""
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError:
            return None


class ClassifierUser(_CnnUser):
    """Sends real test digits as PNG bytes to cnnserve.v1.Classifier/Predict."""

    stub_class = classifier_pb2_grpc.ClassifierStub

    def on_start(self) -> None:
        super().on_start()
        self.images = png_digits()
        self.next = 0

    @task
    def predict(self) -> None:
        batch = [self.images[(self.next + i) % len(self.images)] for i in range(self.per_request)]
        self.next += self.per_request
        self.call(self.stub.Predict, classifier_pb2.PredictRequest(
            model=self.model, top_k=1, images=[classifier_pb2.Image(encoded=b) for b in batch]),
            self.timeout)


class InferenceUser(_CnnUser):
    """Sends preprocessed test digits as raw FP32 tensors over the Open Inference Protocol."""

    stub_class = grpc_service_pb2_grpc.GRPCInferenceServiceStub

    def on_start(self) -> None:
        super().on_start()
        self.requests = self.build_requests()
        self.next = 0

    def build_requests(self) -> list[grpc_service_pb2.ModelInferRequest]:
        """Ask the server for the model's input shape and normalisation, then prepare
        every request up front so the user measures the server, not numpy."""
        try:
            listing = classifier_pb2_grpc.ClassifierStub(self.setup_channel).ListModels(
                classifier_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata)
            info = {m.name: m for m in listing.models}.get(self.model)
        except grpc.RpcError:
            info = None
        if info is None:  # unknown model: send a plausible request, let the server refuse it
            shape, x = (1, 28, 28), np.zeros((IMAGES, 1, 28, 28), np.float32)
        else:
            shape = tuple(info.input_shape)
            prep = Preprocessing(color="L" if shape[0] == 1 else "RGB", height=shape[1],
                                 width=shape[2], mean=tuple(info.mean), std=tuple(info.std))
            images = test_digits()
            if shape[0] == 3:
                images = np.repeat(images, 3, axis=3)
            x = to_input(resize_images(images, prep.color, shape[1], shape[2]), prep)
        out = []
        for start in range(0, IMAGES, self.per_request):
            rows = np.resize(x[start:start + self.per_request], (self.per_request, *shape))
            out.append(grpc_service_pb2.ModelInferRequest(
                model_name=self.model,
                inputs=[grpc_service_pb2.ModelInferRequest.InferInputTensor(
                    name="input", datatype="FP32", shape=list(rows.shape))],
                raw_input_contents=[rows.astype("<f4").tobytes()]))
        return out

    @task
    def infer(self) -> None:
        request = self.requests[self.next % len(self.requests)]
        self.next += 1
        self.call(self.stub.ModelInfer, request, self.timeout)
