"""The Open Inference Protocol's REST binding (KServe v2, with Triton's binary tensor
extension and its repository, statistics and shared memory routes), KServe's v1 predict,
and this project's classify route, on the HTTP port.

Each route translates JSON, and binary tensors after an `Inference-Header-Content-Length`
JSON header, into the core's types (core.oip, core.classify), and renders the answer back
as JSON. Tensors given as JSON `data` become raw bytes at once, so one check covers every
way a tensor arrives.
"""

from __future__ import annotations

import asyncio
import binascii
import math
from base64 import b64decode
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any, TypeVar

import numpy as np
import orjson
from aiohttp import web

from contract.repository import NUMPY_DTYPES
from service.core.admission import Call
from service.core.classify import Classifier
from service.core.oip import InputTensor, OipRequest, OipResponse, OpenInference, Parameter
from service.core.oip import RequestedOutput as Wanted
from service.status import invalid, shown

HEADER_LENGTH = "Inference-Header-Content-Length"
OPENAPI = files("service.frontends").joinpath("openapi.json")
"""The REST surface these routes answer, as an OpenAPI 3.0 document (served at
/openapi.json); tests/service/frontends/test_openapi.py holds the server to it."""
JSON = "application/json"
CALL = web.RequestKey("cnnserve_call", Call)
"""The call the edge admitted for this request (its middleware sets it)."""
_SHM_PARAMETERS = {"shared_memory_region": str, "shared_memory_byte_size": int,
                   "shared_memory_offset": int}
INLINE_PARSE_BYTES = 1 << 16
JSON_EXPANSION = 16
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type=JSON)


def _count(value: object) -> bool:
    """A non-negative 64-bit integer (JSON's true and false are not)."""
    return type(value) is int and 0 <= value < 2**63


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        invalid(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _shm_parameters(given: dict[str, Any], what: str) -> dict[str, Parameter]:
    """Triton's shared memory parameters, checked; the others are the binding's own."""
    found: dict[str, Parameter] = {}
    for key, kind in _SHM_PARAMETERS.items():
        if key in given:
            value = given[key]
            if kind is int and not _count(value):
                invalid(f"{what}: {key} must be a non-negative 64-bit integer")
            if kind is str and not isinstance(value, str):
                invalid(f"{what}: {key} must be a string")
            found[key] = value
    return found


def parse_infer(body: bytes, header_length: str | None, model: str, version: str, call: Call
                ) -> tuple[OipRequest, set[str] | None]:
    """The request in the core's types, and the outputs to answer in binary (None: all of
    them)."""
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            invalid(f"{HEADER_LENGTH} must be the JSON header's length, at most the body's "
                    f"{len(body)} bytes, got {shown(header_length, 20)}")
        split = int(header_length)
    doc = _object(_loads(body[:split], call), "the request")
    given_inputs = doc.get("inputs")
    if not isinstance(given_inputs, list) or not given_inputs:
        invalid("the request needs a non-empty 'inputs' list")
    inputs: list[InputTensor] = []
    raw: list[bytes] = []
    binary, offset = memoryview(body)[split:], 0
    for i, given in enumerate(given_inputs[:64]):
        item = _object(given, f"input {i}")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not (
                isinstance(shape, list) and len(shape) <= 16
                and all(_count(d) for d in shape)):
            invalid(f"input {i} needs 'name' (string), 'datatype' (string) and 'shape' "
                    "(at most 16 non-negative 64-bit integers)")
        what = f"input {shown(name, 64)}"
        parameters = _object(item.get("parameters") or {}, f"{what} parameters")
        shm = _shm_parameters(parameters, what)
        inputs.append(InputTensor(name, datatype, shape, shm))
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not _count(size) or offset + size > len(binary):
                invalid(f"{what}: binary_data_size {shown(str(size), 20)} "
                        f"runs past the {len(binary)} bytes after the JSON header")
            raw.append(bytes(binary[offset:offset + size]))
            offset += size
        elif "data" in item:
            raw.append(_json_tensor(item["data"], name, datatype, shape))
        elif "shared_memory_region" not in shm:
            invalid(f"{what} carries no data: give 'data', binary data or a shared memory "
                    "region")
    if offset != len(binary):
        invalid(f"{len(binary) - offset} bytes of binary data belong to no input")
    everything = _object(doc.get("parameters") or {}, "the request's parameters").get(
        "binary_data_output") is True
    binary_outputs: set[str] = set()
    given_outputs = doc.get("outputs") or []
    if not isinstance(given_outputs, list):
        invalid("'outputs' must be a list")
    outputs: list[Wanted] = []
    for i, given in enumerate(given_outputs[:64]):
        item = _object(given, f"output {i}")
        name = item.get("name")
        if not isinstance(name, str):
            invalid(f"output {i} needs a 'name'")
        what = f"output {shown(name, 64)}"
        parameters = _object(item.get("parameters") or {}, f"{what} parameters")
        outputs.append(Wanted(name, _shm_parameters(parameters, what)))
        if parameters.get("binary_data") is True:
            binary_outputs.add(name)
    request = OipRequest(model=model, version=version, id=str(doc.get("id", ""))[:256],
                         inputs=inputs, raw=raw, outputs=outputs)
    return request, None if everything else binary_outputs


def _json_tensor(data: object, name: str, datatype: str, shape: list[int]) -> bytes:
    """JSON values (flat or nested, row-major) as the tensor's raw bytes."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        invalid(f"input {shown(name, 64)}: datatype {shown(datatype, 16)} cannot travel as "
                "JSON data here")
    if not isinstance(data, list):
        invalid(f"input {shown(name, 64)}: 'data' must be a list")
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        invalid(f"input {shown(name, 64)}: 'data' is not {datatype} values ({exc})")
    if array.size != math.prod(shape):
        invalid(f"input {shown(name, 64)} of shape {shape[:16]} needs {math.prod(shape)} "
                f"values, got {array.size}")
    return array.tobytes()


def render_infer(response: OipResponse, binary: set[str] | None) -> web.Response:
    """JSON outputs, or a JSON header followed by binary outputs (Triton's extension)."""
    outputs, blobs = [], []
    for output in response.outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype,
                                 "shape": list(output.shape)}
        if output.region is not None:
            entry["parameters"] = {"shared_memory_region": output.region,
                                   "shared_memory_byte_size": output.written}
        elif binary is None or output.name in binary:
            entry["parameters"] = {"binary_data_size": len(output.raw)}
            blobs.append(output.raw)
        else:
            entry["data"] = np.frombuffer(output.raw, NUMPY_DTYPES[output.datatype]).tolist()
        outputs.append(entry)
    # "id" is always present, empty when the request named none: KServe's SDK requires it.
    doc: dict[str, Any] = {"id": response.id, "model_name": response.model,
                           "model_version": response.version, "outputs": outputs}
    header = orjson.dumps(doc)
    if not blobs:
        return web.Response(body=header, content_type=JSON)
    return web.Response(body=b"".join([header, *blobs]),
                        headers={HEADER_LENGTH: str(len(header))},
                        content_type="application/octet-stream")


class InferenceRoutes:
    """The v2 REST routes; each reads its request, asks `OpenInference` (or the
    classifier), renders. The body is read through the edge's `read_body` and
    `read_files`, which hold it to the edge's limits and charge the call for it."""

    def __init__(self, oip: OpenInference, classifier: Classifier,
                 read_body: Callable[[web.Request], Awaitable[bytes]],
                 read_files: Callable[[web.Request], Awaitable[list[bytes]]]) -> None:
        self.oip = oip
        self.classifier = classifier
        self.read_body = read_body
        self.read_files = read_files
        self.openapi = OPENAPI.read_bytes()

    def routes(self) -> list[web.RouteDef]:
        model = "/v2/models/{name}"
        versioned = [model, model + "/versions/{version}"]
        table = [web.get("/openapi.json", self.openapi_document),
                 web.get("/v2", self.server_metadata),
                 web.get("/v2/", self.server_metadata),
                 web.get("/v2/health/live", self.live),
                 web.get("/v2/health/ready", self.ready),
                 web.post("/v2/repository/index", self.repository_index),
                 web.post("/v2/repository/models/{name}/load", self.load),
                 web.post("/v2/repository/models/{name}/unload", self.unload),
                 web.get("/v2/models/stats", self.statistics)]
        for path in versioned:
            table += [web.get(path, self.model_metadata),
                      web.get(path + "/ready", self.model_ready),
                      web.get(path + "/config", self.model_config),
                      web.get(path + "/stats", self.statistics),
                      web.post(path + "/infer", self.infer),
                      web.post(path + "/classify", self.classify)]
        table += [web.get("/v1/models/{name}", self.v1_model),
                  web.post("/v1/models/{name}:predict", self.v1_predict)]
        for kind in ("system", "cuda"):
            base = f"/v2/{kind}sharedmemory"
            table += [web.get(base + "/status", self.shm_status),
                      web.get(base + "/region/{region}/status", self.shm_status),
                      web.post(base + "/region/{region}/register", self.shm_register),
                      web.post(base + "/unregister", self.shm_unregister),
                      web.post(base + "/region/{region}/unregister", self.shm_unregister)]
        return table

    async def openapi_document(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi, content_type=JSON)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(self.oip.server_metadata())

    async def live(self, request: web.Request) -> web.Response:
        """The protocol's bodies with the status Triton's clients read; not ready is 503,
        as KServe answers, so probes and load balancers take the instance out."""
        return json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.oip.server_ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        """A model or version the server does not know is 404 (the protocol's missing
        resource); one it knows that is not ready now is 503."""
        name, version = request.match_info["name"], request.match_info.get("version", "")
        ready = self.oip.model_ready(name, version)
        if not ready:
            self.oip.require_known(name, version)
        return json_response({"name": name, "ready": ready}, 200 if ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return json_response(self.oip.model_metadata(
            request.match_info["name"], request.match_info.get("version", ""), request[CALL]))

    async def model_config(self, request: web.Request) -> web.Response:
        """The configuration itself, as Triton's HTTP API answers it (not wrapped)."""
        return json_response(self.oip.model_config(
            request.match_info["name"], request.match_info.get("version", ""), request[CALL]))

    async def statistics(self, request: web.Request) -> web.Response:
        return json_response(self.oip.model_statistics(
            request.match_info.get("name", ""), request.match_info.get("version", ""),
            request[CALL]))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await self.read_body(request)
        ready = bool(body) and _object(_loads(body, request[CALL]), "the request").get(
            "ready") is True
        return json_response(await self.oip.repository_index(ready))

    async def load(self, request: web.Request) -> web.Response:
        body = await self.read_body(request)
        parameters = (_object(_loads(body, request[CALL]), "the request").get("parameters")
                      if body else None)
        await self.oip.load(request.match_info["name"],
                            list(_object(parameters, "the load parameters"))
                            if parameters else [])
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await self.read_body(request)
        await self.oip.unload(request.match_info["name"])
        return web.Response(status=200)

    async def infer(self, request: web.Request) -> web.Response:
        call = request[CALL]
        name, version = request.match_info["name"], request.match_info.get("version", "")
        self.oip.require(name, version, call)  # an unknown model is 404 before the body
        body = await self.read_body(request)
        message, binary = await off_loop(len(body), parse_infer, body,
                                         request.headers.get(HEADER_LENGTH), name, version,
                                         call)
        del body
        answer = await self.oip.infer(message, "http", self._timeout(request), call)
        return render_infer(answer, binary)

    async def classify(self, request: web.Request) -> web.Response:
        """Encoded images in (the body, or multipart files), labels and probabilities out;
        `top_k` from the query (default 1)."""
        if request.content_type.startswith("multipart/"):
            images = await self.read_files(request)
        else:
            images = [await self.read_body(request)]
        if not any(images):
            invalid("the request holds no image: post its bytes (image/png, image/jpeg, ...) "
                    "or a multipart/form-data body of images")
        top_k = request.query.get("top_k", "1")
        if not top_k.isdigit():
            invalid(f"top_k must be a positive integer, got {shown(top_k, 20)}")
        answer = await self.classifier.classify(
            request.match_info["name"], request.match_info.get("version", ""),
            images, int(top_k), "http", self._timeout(request), request[CALL])
        return json_response({"model": answer.model, "version": answer.version,
                              "classifications": [{"predictions": [
                                  {"label": p.label, "index": p.index,
                                   "probability": p.probability} for p in predictions]}
                                  for predictions in answer.classifications]})

    async def v1_model(self, request: web.Request) -> web.Response:
        """KServe's v1 protocol: the model's readiness (404 for one not served)."""
        name = request.match_info["name"]
        ready = self.oip.model_ready(name)
        if not ready:
            self.oip.require_known(name)
        return json_response({"name": name, "ready": ready}, 200 if ready else 503)

    async def v1_predict(self, request: web.Request) -> web.Response:
        """KServe's v1 protocol: `{"instances": [...]}` in, `{"predictions": [...]}` out.
        Instances `{"b64": <encoded image>}` are classified (label, index, probability);
        others are rows of a single-input model's tensor, answered with its first output."""
        name = request.match_info["name"]
        call = request[CALL]
        body = await self.read_body(request)
        size = len(body)
        doc = _object(await off_loop(size, _loads, body, call), "the request")
        del body
        instances = doc.get("instances")
        if not isinstance(instances, list) or not instances:
            invalid("the request needs a non-empty 'instances' list")
        if all(isinstance(i, dict) and set(i) == {"b64"} for i in instances):
            try:
                images = [b64decode(str(i["b64"]), validate=True) for i in instances]
            except (binascii.Error, ValueError) as exc:
                invalid(f"an instance's b64 is not base64: {exc}")
            answer = await self.classifier.classify(name, "", images, 1, "http",
                                                    self._timeout(request), call)
            return json_response({"predictions": [
                {"label": c[0].label, "index": c[0].index, "probability": c[0].probability}
                for c in answer.classifications]})
        inputs = self.oip.model_metadata(name, "", call)["inputs"]
        if len(inputs) != 1:
            invalid(f"model {shown(name, 64)} takes {len(inputs)} inputs; v1 instances "
                    "fit single-input models: use the v2 protocol")
        (spec,) = inputs
        dtype = NUMPY_DTYPES.get(spec["datatype"])
        if dtype is None:
            invalid(f"input datatype {spec['datatype']} cannot travel as v1 instances")
        rows = await off_loop(size, _rows, instances, dtype, spec["datatype"])
        message = OipRequest(model=name, inputs=[InputTensor(spec["name"], spec["datatype"],
                                                             rows.shape)],
                             raw=[rows.tobytes()])
        result = await self.oip.infer(message, "http", self._timeout(request), call)
        first = result.outputs[0]
        values = np.frombuffer(first.raw, NUMPY_DTYPES[first.datatype])
        return json_response({"predictions": values.reshape(first.shape).tolist()})

    async def shm_status(self, request: web.Request) -> web.Response:
        region = request.match_info.get("region", "")
        if "/cudasharedmemory" in request.path:
            return json_response(self.oip.cuda_status(region))
        return json_response(self.oip.system_status(region))

    async def shm_register(self, request: web.Request) -> web.Response:
        doc = _object(_loads(await self.read_body(request), request[CALL]), "the request")
        region = request.match_info["region"]
        try:
            if "/cudasharedmemory" in request.path:
                handle = _object(doc.get("raw_handle"), "raw_handle").get("b64")
                self.oip.register_cuda(region, b64decode(str(handle), validate=True),
                                       int(doc.get("device_id", 0)), int(doc["byte_size"]))
            else:
                self.oip.register_system(region, str(doc["key"]), int(doc.get("offset", 0)),
                                         int(doc["byte_size"]))
        except (KeyError, ValueError, TypeError, binascii.Error) as exc:
            invalid(f"a registration needs key (system) or raw_handle (CUDA) and byte_size: "
                    f"{type(exc).__name__} {exc}")
        return web.Response(status=200)

    async def shm_unregister(self, request: web.Request) -> web.Response:
        await self.read_body(request)
        region = request.match_info.get("region", "")
        if "/cudasharedmemory" in request.path:
            self.oip.unregister_cuda(region)
        else:
            self.oip.unregister_system(region)
        return web.Response(status=200)

    def _timeout(self, request: web.Request) -> float | None:
        """The client's deadline: a `timeout` header or query parameter, in seconds."""
        given = request.headers.get("timeout") or request.query.get("timeout")
        if given is None:
            return None
        try:
            seconds = float(given)
        except ValueError:
            invalid(f"timeout must be seconds, got {shown(given, 20)}")
        if not seconds > 0:
            invalid(f"timeout must be positive, got {shown(given, 20)}")
        return seconds


def _rows(instances: list[Any], dtype: np.dtype[Any], datatype: str) -> np.ndarray:
    try:
        return np.asarray(instances, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        invalid(f"the instances are not rows of {datatype} values ({exc})")


async def off_loop(size: int, parse: Callable[..., T], *args: Any) -> T:
    """`parse(*args)` for a body of `size` bytes: inline when small, in a thread when
    large, so that a large JSON body does not stop every other call on the event loop,
    gRPC's included."""
    if size <= INLINE_PARSE_BYTES:
        return parse(*args)
    return await asyncio.to_thread(parse, *args)


def _loads(text: bytes, call: Call) -> object:
    """JSON, charged to the call first for what parsing makes of it: up to about 16 times
    its text (the two bytes of `0,` become a float object and a list slot, 32 bytes)."""
    call.charge(JSON_EXPANSION * len(text), "the parsed JSON")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        invalid(f"the request is not valid JSON: {exc}")
