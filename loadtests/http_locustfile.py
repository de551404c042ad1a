"""Locust users for cnnserve's REST port (8000): the Open Inference Protocol over HTTP.

    locust -f loadtests/http_locustfile.py --host http://127.0.0.1:8000        # web UI
    locust -f loadtests/http_locustfile.py --host http://127.0.0.1:8000 --headless \
        -u 32 -r 32 -t 30s --model lenet HttpBinaryUser

`HttpBinaryUser` sends tensors with Triton's binary extension (what tritonclient.http
sends), `HttpJsonUser` as JSON `data`, `HttpPngUser` PNG files to `/classify`. Tensors are
held-out digits resized to the model's input and scaled to [0, 1] (the REST port has no
call for a model's normalisation; throughput does not depend on it). Its own file, so a
gRPC run (`locustfile.py`) never starts HTTP users. Options as there: --model,
--images-per-request, --http-timeout, --http-token (see the web UI's custom parameters).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from locust import FastHttpUser, events, task

from contract.datasets import encode_png
from contract.preprocessing import resize_images
from loadtests.locustfile import IMAGES, png_digits, test_digits
from loadtests.report import row_name

ROWS = {"binary": "REST infer binary", "json": "REST infer json", "png": "REST classify png"}
"""The call in each user class's row name (`row_name`: `REST infer binary lenet x1`)."""


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--http-timeout", type=float, default=10.0, env_var="LOCUST_HTTP_TIMEOUT",
                        help="deadline of each request, seconds")
    parser.add_argument("--http-token", env_var="LOCUST_HTTP_TOKEN", is_secret=True,
                        help="bearer token sent with every request")


class _RestUser(FastHttpUser):
    abstract = True
    kind = "binary"
    route = "infer"

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.model = getattr(opts, "model", "lenet")
        self.per_request = getattr(opts, "images_per_request", 1)
        self.headers = {"timeout": str(getattr(opts, "http_timeout", 10.0))}
        token = getattr(opts, "http_token", None)
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.bodies = self.build()
        self.next = 0

    def build(self) -> list[tuple[bytes, dict[str, str]]]:
        """Every request, prepared before the run: the user measures the server."""
        with self.client.get(f"/v2/models/{self.model}", headers=self.headers,
                             name="REST metadata", catch_response=True) as answer:
            shape = (answer.json()["inputs"][0]["shape"][1:] if answer.status_code == 200
                     else [1, 28, 28])
        images = test_digits()
        if shape[0] == 3:
            images = np.repeat(images, 3, axis=3)
        color = "L" if shape[0] == 1 else "RGB"
        x = resize_images(images, color, shape[1], shape[2]).astype(np.float32) / 255
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        bodies = []
        for start in range(0, IMAGES, self.per_request):
            rows = np.resize(x[start:start + self.per_request], (self.per_request, *shape))
            tensor: dict[str, Any] = {"name": "input", "datatype": "FP32",
                                      "shape": list(rows.shape)}
            if self.kind == "json":
                tensor["data"] = rows.ravel().tolist()
                bodies.append((json.dumps({"inputs": [tensor]}).encode(),
                               {"Content-Type": "application/json"}))
                continue
            tensor["parameters"] = {"binary_data_size": rows.nbytes}
            header = json.dumps({"inputs": [tensor], "outputs": [
                {"name": "logits", "parameters": {"binary_data": True}}]}).encode()
            bodies.append((header + rows.astype("<f4").tobytes(),
                           {"Inference-Header-Content-Length": str(len(header)),
                            "Content-Type": "application/octet-stream"}))
        return bodies

    @task
    def infer(self) -> None:
        body, headers = self.bodies[self.next % len(self.bodies)]
        self.next += 1
        self.client.post(f"/v2/models/{self.model}/{self.route}",
                         data=body,  # type: ignore[arg-type]
                         headers={**self.headers, **headers},
                         name=row_name(ROWS[self.kind], self.model, self.per_request))


class HttpBinaryUser(_RestUser):
    kind = "binary"


class HttpJsonUser(_RestUser):
    kind = "json"


class HttpPngUser(_RestUser):
    kind = "png"
    route = "classify"

    def build(self) -> list[tuple[bytes, dict[str, str]]]:
        if self.per_request == 1:
            return [(png, {"Content-Type": "image/png"}) for png in png_digits()]
        boundary = "cnnserve-locust"
        bodies = []
        for start in range(0, IMAGES, self.per_request):
            files = [encode_png(image) for image in
                     test_digits()[start:start + self.per_request]]
            parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                             f"filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n".encode()
                             + png + b"\r\n" for i, png in enumerate(files))
            bodies.append((parts + f"--{boundary}--\r\n".encode(),
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return bodies
